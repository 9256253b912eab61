"""Datasets: the offline embedded benchmark, the dataset store, episodes, transforms and loading."""
