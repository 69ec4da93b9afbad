"""A registered version at work: packages, the registry, the predictor, the served pyfunc, daily scoring."""
