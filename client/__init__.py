"""Flower ClientApp of TaskEdge-FL: statistics query, sparse training and evaluation handlers."""
