"""A black-box teacher: any OpenAI-compatible HTTP server. Checked before the run, read after.

Only text crosses: the server may run any model with any tokenizer. The request workers
(plad_ray.generate.endpoint_worker) ride out outages, honour rate limits and set refused
prompts aside. The API key is read from an environment variable inside each request worker
when it opens its session; it is never in the config, the Ray task arguments, the logs or
the outputs.
"""

import json
import os
import urllib.error
import urllib.request

from plad_ray.config import EndpointConfig
from plad_ray.errors import ConfigError, DataError

REQUEST_WORKER_CPUS = 0.25  # request workers wait on the network, not the CPU


def api_key(endpoint: EndpointConfig) -> str | None:
    if not endpoint.api_key_env:
        return None
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        raise ConfigError(f"config key teacher.endpoint.api_key_env: environment variable {endpoint.api_key_env} is "
                          "not set; export it (the key itself never goes in a config)")
    return key


def base_url(url: str) -> str:
    """The API root of a (chat) completions URL: http://host/v1 of http://host/v1/chat/completions."""
    return url.rstrip("/").rsplit("/chat/completions", 1)[0].rsplit("/completions", 1)[0]


def models_url(url: str) -> str:
    """The server's model list beside its (chat) completions URL: what answers when the server is up."""
    return base_url(url) + "/models"


def check_endpoint(endpoint: EndpointConfig, model: str) -> None:
    """Before generation: the server answers, accepts the key, and serves `model`."""
    base = base_url(endpoint.url)
    request = urllib.request.Request(base + "/models")
    key = api_key(endpoint)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            served = [m.get("id") for m in json.loads(response.read()).get("data", [])]
    except urllib.error.HTTPError as e:
        hint = "; check the key in $" + str(endpoint.api_key_env) if e.code in (401, 403) else ""
        raise DataError(f"teacher endpoint {base}/models: HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"teacher endpoint {base}: not reachable ({getattr(e, 'reason', e)}); "
                        "check teacher.endpoint.url and that the server is up") from None
    if served and model not in served:
        raise DataError(f"config key teacher.model: the endpoint serves {', '.join(map(str, served))}, "
                        f"not {model!r}; set teacher.model to the served model name")


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
