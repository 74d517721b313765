"""Where data comes from: the `source.Source` interface, its implementations and what they share
(`catalogue.source` chooses one)."""
