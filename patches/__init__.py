"""Data only: the project's llama.cpp patch set lives in `llama.cpp/` beside this file (see
`llamafleet.common.llamacpp.patches`). A package so the installed distribution carries it."""
