"""Deployment (DESIGN 11): a trained run serving actions to a robot or a simulator outside this process.

    chunking.py     the chunk scheduler of simulators and robots: inference delay, execution horizon, sync | naive | rtc
    protocol.py     openpi's wire format: msgpack with numpy arrays (torch-free)
    observation.py  one client observation checked and mapped to the run's inputs by the SERVE_* keys (torch-free)
    runner.py       the run opened for inference and the per-episode state (online world latents)
    server.py       `fplus serve`: the websocket policy server speaking openpi's protocol

Docs: docs/deploy.md.
"""
