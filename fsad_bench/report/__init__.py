"""Reporting: paper-style tables, paired significance, published numbers, costs, plots, export."""
