"""Shipped learned-optimizer checkpoints, installed as the data package l2l.checkpoints."""
