"""`lit-adapter serve`: an OpenAI-compatible HTTP server with continuous batching and a browser chat page.

Rooms: `scheduler.py` (the continuous batch over the model's KV cache, its decoding thread), `protocol.py` (the
OpenAI request and response shapes, errors), `prompting.py` (conversations to prompt ids and an image),
`images.py` (image parts), `media.py` (an ImageBind-LLM adapter's image and audio parts), `app.py` (the FastAPI
app, streaming, API key, limits), `cli.py` (the command), `static/index.html` (the chat page).
"""
