"""ASGI middlewares and what they share: API keys, admission and body limits, request deadlines."""
