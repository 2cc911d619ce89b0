"""A worker plugin that fails on import, for the supervisor's give-up test."""

raise RuntimeError("this plugin is broken on purpose")
