"""Bridges to other libraries, each imported only when used: `langchain.py` (a LangChain chat model running a
checkpoint and adapter in this process)."""
