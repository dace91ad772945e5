"""A black-box teacher: any OpenAI-compatible HTTP server. Checked before the run, read after.

Only text crosses: the server may run any model with any tokenizer. The request workers
(plad_ray.generate.endpoint_worker) ride out outages, honour rate limits, and set aside the
prompts the server refuses or keeps failing on while it answers others. The API key is read
from an environment variable inside each request worker when it opens its session; it is
never in the config, the Ray task arguments, the logs or the outputs.
"""

import json
import os
import urllib.error
import urllib.request

from plad_ray.config import EndpointConfig
from plad_ray.errors import ConfigError, DataError
from plad_ray.generate.endpoint_policy import error_text

# Request workers wait on the network, not the CPU, so they reserve none. (With 0.25 each, the workers of a failed
# stage, which Ray Data's actor pool does not shut down while their failed batch is on its books, held CPUs that a
# later stage in the same cluster then waited for forever: a Parquet write task of 1 CPU on a 2-CPU test cluster.)
REQUEST_WORKER_CPUS = 0


def api_key(endpoint: EndpointConfig) -> str | None:
    if not endpoint.api_key_env:
        return None
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        raise ConfigError(
            f"config key teacher.endpoint.api_key_env: environment variable {endpoint.api_key_env} is "
            "not set; export it (the key itself never goes in a config)"
        )
    return key


def base_url(url: str) -> str:
    """The API root of a (chat) completions URL: http://host/v1 of http://host/v1/chat/completions."""
    return url.rstrip("/").rsplit("/chat/completions", 1)[0].rsplit("/completions", 1)[0]


def models_url(url: str) -> str:
    """The server's model list beside its (chat) completions URL: what answers when the server is up."""
    return base_url(url) + "/models"


def completions_url(url: str) -> str:
    """The completions URL beside a (chat) completions URL: where token ids may be the prompt."""
    return base_url(url) + "/completions"


def server_root(url: str) -> str:
    """The server's root (http://host of http://host/v1/completions): vLLM serves /tokenize there."""
    base = base_url(url)
    return base[: -len("/v1")] if base.endswith("/v1") else base


def call(endpoint: EndpointConfig, url: str, payload: dict | None = None) -> tuple[int, dict | None, str]:
    """One GET (or POST of `payload` as JSON) with the endpoint's key: (HTTP status, JSON body or None, text).
    An unreachable server raises DataError with its reason."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    key = api_key(endpoint)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"teacher endpoint {base_url(endpoint.url)}: not reachable ({getattr(e, 'reason', e)}); "
            "check teacher.endpoint.url and that the server is up"
        ) from None
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    return status, body if isinstance(body, dict) else None, text


def check_endpoint(endpoint: EndpointConfig, model: str) -> dict:
    """Before generation: the server answers, accepts the key, and serves `model`; its /models entry for it
    (vLLM's says max_model_len)."""
    base = base_url(endpoint.url)
    status, body, text = call(endpoint, base + "/models")
    if status != 200:
        hint = "; check the key in $" + str(endpoint.api_key_env) if status in (401, 403) else ""
        raise DataError(f"teacher endpoint {base}/models: {error_text(status, text)}{hint}")
    cards = [m for m in (body or {}).get("data", []) if isinstance(m, dict)]
    if cards and model not in [m.get("id") for m in cards]:
        raise DataError(
            f"config key teacher.model: the endpoint serves {', '.join(str(m.get('id')) for m in cards)}, "
            f"not {model!r}; set teacher.model to the served model name"
        )
    return next((m for m in cards if m.get("id") == model), {})


def read_response(response: dict, stop_configured: bool = False) -> dict:
    """text, num_tokens, finish_reason (eos | stop | length) of an OpenAI completions or chat response.

    OpenAI's "stop" covers both the end-of-sequence token and a stop string. vLLM's server
    tells them apart with `stop_reason` (null or a token id: EOS; a string: that stop
    string); a server without it ended on EOS unless a stop string was configured.
    """
    choice = response["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    usage = response.get("usage") or {}
    if choice.get("finish_reason") == "length":
        reason = "length"
    elif "stop_reason" in choice:
        reason = "stop" if isinstance(choice["stop_reason"], str) else "eos"
    else:
        reason = "stop" if stop_configured else "eos"
    return {"text": text or "", "num_tokens": int(usage.get("completion_tokens") or 0), "finish_reason": reason}
