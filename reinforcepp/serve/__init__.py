"""The servers of ``reinforcepp serve``: models that only run inference, behind a URL.

* :mod:`.app` -- what every server shares (guard, JSON, binding, running);
* :mod:`.reference` -- reference log-probs (``serve reference``);
* :mod:`.reward` -- a reward source (``serve reward``);
* :mod:`.cli` -- the command line.

The clients are in :mod:`reinforcepp.remote` (which imports nothing from here); the protocol
is :mod:`reinforcepp.remote.protocol` and docs/remote.md. Needs the ``serve`` extra.
"""
