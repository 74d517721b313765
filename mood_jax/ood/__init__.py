"""Out-of-distribution scoring: scorers, metrics and result reports."""
