"""Gradient noise scale and learning-rate / batch-size laws."""
