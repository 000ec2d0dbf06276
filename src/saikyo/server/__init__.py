"""The HTTP server: app factory, routes, middlewares, served models, metrics."""

from saikyo.server.app import create_app

__all__ = ["create_app"]
