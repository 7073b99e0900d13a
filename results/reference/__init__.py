"""Published reference numbers (``regad_paper.csv``), installed as package data."""
