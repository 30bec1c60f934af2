"""The paper's network, its trainer and evaluation."""
