"""Evaluation: runs of every method and baseline over stored passes, reports with significance, analyses, plots."""
