"""`glimprouter`: the command line of GlimpRouter (up, ask, session, models)."""
