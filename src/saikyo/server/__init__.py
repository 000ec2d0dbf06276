"""The HTTP server: app factory, routes, model registry."""

from saikyo.server.app import create_app

__all__ = ["create_app"]
