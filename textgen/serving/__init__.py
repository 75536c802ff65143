"""Serving: `textgen serve`'s catalogue of runs and its limits (server.py), the ASGI app that speaks HTTP
(http_app.py, the page in static/), and the uvicorn server that holds the sockets (http_server.py, the
[serve] extra). Imports generation and the LSTM; nothing imports serving but the command line."""
