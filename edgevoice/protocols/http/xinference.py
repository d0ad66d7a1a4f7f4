"""What Xinference's Python client (``xinference-client``) needs beyond the ``/v1`` audio API.

``Client(url)`` first asks ``GET /v1/cluster/auth`` whether the cluster
wants a key (``{"auth": true}`` when ``[http] api_key`` is set: only then does
the client send ``Authorization: Bearer <api_key>``; this route is public).
``client.get_model(uid)`` reads ``GET /v1/models/{uid}`` and picks its handle
from ``model_type`` (``"audio"`` for every edgevoice model), so a Xinference
model uid must name an edgevoice model or one of its ``aliases`` (a uid like
``CosyVoice2-0.5B`` is an alias of the cloning model). Its ``speech(...)`` and
``transcriptions(...)`` calls are the OpenAI routes, with extra arguments as a
JSON ``kwargs`` string (:func:`~edgevoice.protocols.http.compat.unpack_kwargs`).
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from edgevoice.protocols.http.state import state

CLUSTER_AUTH_PATH: Final = "/v1/cluster/auth"


async def cluster_auth(request: web.Request) -> web.Response:
    """``GET /v1/cluster/auth``: whether requests must carry the API key."""
    return web.json_response({"auth": state(request).api_key is not None})


def add_xinference_routes(app: web.Application) -> None:
    """Xinference's cluster-auth probe (the model lookup is ``/v1/models/{id}``)."""
    app.router.add_get(CLUSTER_AUTH_PATH, cluster_auth)
