"""The Pulumi program's building blocks: one module per concern (see __main__.py for how they fit together)."""
