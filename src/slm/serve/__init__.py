"""Serving a trained model over HTTP: a JSON API, Server-Sent Events streaming, and a small web page."""

from slm.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
