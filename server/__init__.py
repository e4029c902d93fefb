"""Flower ServerApp of TaskEdge-FL: reconciliation, masked aggregation, checkpoints and results."""
