"""What the service does with features: classify now (embed and search next), Flask-free."""
