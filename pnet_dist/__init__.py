"""pnet_dist: distributed pretraining of ParameterNet models."""
