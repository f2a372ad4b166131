"""Small shared utilities: process-group helpers, logging, environment information."""
