"""Example task modules: ``nerv worker --app nerv_cluster.examples.wordcount``."""
