#!/usr/bin/env bash
# Smoke test of the Docker image, end to end, on loopback only:
#   build -> run with the tiny model (offline) -> upload two PNGs -> text and image search
#   -> restart the container, then re-create it on the same volume -> the data is still there
#   -> print the image size -> clean up.
#
#   bash scripts/docker_smoke.sh              # from the repository root (or anywhere)
#   SKIP_BUILD=1 bash scripts/docker_smoke.sh # reuse localhost/xmodal:dev
#
# Uses rootful podman set up by ../shared/docker_build_local.sh (see ../shared/DOCKER.md).
# Knobs: XMODAL_IMAGE (tag), SMOKE_PORT (host port on 127.0.0.1), READY_TIMEOUT (seconds),
#        KEEP=1 (leave the container and volume for inspection).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
SHARED=${XM_SHARED:-$REPO/../shared}
TAG=${XMODAL_IMAGE:-localhost/xmodal:dev}
PORT=${SMOKE_PORT:-18000}
READY_TIMEOUT=${READY_TIMEOUT:-240}
NAME=xmodal-smoke-$$
VOL=xmodal-smoke-data-$$
BASE=http://127.0.0.1:$PORT
WORK=$(mktemp -d)

export CONTAINERS_CONF=${XM_DOCKER_HOME:-/tmp/xmodal-docker}/containers.conf
# Docker image format: the OCI format drops HEALTHCHECK.
export BUILDAH_FORMAT=docker

log() { echo "[smoke] $*" >&2; }
# Runs a podman command, showing its stderr only when it fails (rootful podman without systemd
# logs that it cannot schedule the periodic healthcheck on every run/restart/rm; harmless here:
# `podman healthcheck run` below runs the image's HEALTHCHECK directly).
quiet() { "$@" 2>"$WORK/podman.err" >/dev/null || { cat "$WORK/podman.err" >&2; return 1; }; }
fail() {
  log "FAIL: $*"
  log "last lines of the container's log:"
  podman logs --tail 60 "$NAME" 2>&1 | sed 's/^/    /' >&2 || true
  exit 1
}

cleanup() {
  local rc=$?
  if [ "${KEEP:-0}" = 1 ]; then
    log "KEEP=1: left container $NAME and volume $VOL"
  else
    podman rm -f "$NAME" >/dev/null 2>&1 || true
    podman volume rm -f "$VOL" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
  if [ "$rc" = 0 ]; then log "PASS"; else log "exit code $rc"; fi
}
trap cleanup EXIT

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "building $TAG"
  nice -n 10 bash "$SHARED/docker_build_local.sh" build . "$TAG"
else
  bash "$SHARED/docker_build_local.sh" >/dev/null  # tools and containers.conf only
fi

run_container() {
  # The image's default CMD (xmodal serve), configured through the environment only.
  podman run -d --name "$NAME" \
    -p "127.0.0.1:$PORT:8000" \
    -v "$VOL:/data" \
    -e HF_HUB_OFFLINE=1 \
    -e XMODAL_MODEL__NAME=xmodal-tiny \
    -e XMODAL_MODEL__PRETRAINED=none \
    "$TAG" 2>"$WORK/podman.err" >/dev/null || { cat "$WORK/podman.err" >&2; fail "podman run"; }
}

wait_ready() {
  local start=$SECONDS
  log "waiting for $BASE/readyz (up to ${READY_TIMEOUT}s)"
  until curl -fsS -o /dev/null --max-time 3 "$BASE/readyz" 2>/dev/null; do
    if [ "$(podman inspect --format '{{.State.Running}}' "$NAME" 2>/dev/null)" != true ]; then
      fail "container stopped before it was ready"
    fi
    if (( SECONDS - start > READY_TIMEOUT )); then fail "not ready after ${READY_TIMEOUT}s"; fi
    sleep 2
  done
  log "ready after $((SECONDS - start))s"
}

# The HTTP checks, in Python's standard library only (no venv needed on the host).
cat > "$WORK/check.py" <<'PY'
import hashlib, io, json, struct, sys, urllib.error, urllib.request, uuid, zlib

base, phase, state_path = sys.argv[1], sys.argv[2], sys.argv[3]


def png(width, height, pixel):
    """A PNG written by hand: pixel(x, y) -> (r, g, b)."""
    rows = b"".join(
        b"\x00" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height)
    )
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


RED = png(96, 96, lambda x, y: (220, 30, 30) if 24 <= x < 72 and 24 <= y < 72 else (250, 250, 250))
BLUE = png(96, 96, lambda x, y: (30, 60, 220) if (x - 48) ** 2 + (y - 48) ** 2 < 700 else (250, 250, 250))


def call(method, path, *, json_body=None, fields=None, files=None, expect=(200,)):
    headers = {"Accept": "application/json"}
    data = None
    if json_body is not None:
        data = json.dumps(json_body).encode()
        headers["Content-Type"] = "application/json"
    elif fields is not None or files is not None:
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in (fields or {}).items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for name, filename, content in files or []:
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: image/png\r\n\r\n".encode() + content + b"\r\n"
            )
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    req = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            status, body, ctype = res.status, res.read(), res.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, body, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
    if status not in expect:
        sys.exit(f"{method} {path}: HTTP {status}, expected {expect}: {body[:500]!r}")
    return json.loads(body) if "json" in ctype and body else body


def check(cond, what):
    if not cond:
        sys.exit(f"check failed: {what}")
    print(f"  ok: {what}")


def ids_of(res):
    return [r["id"] for r in res["results"]]


if phase == "first":
    info = call("GET", "/v1/info")
    print("  info:", json.dumps(info["model"]), info["counts"])
    check(info["model"]["name"] == "xmodal-tiny", "the tiny model is loaded")
    page = call("GET", "/")
    check(b"<html" in page.lower() and b"xmodal" in page, "GET / serves the web page")
    call("GET", "/static/app.js")
    up = call("POST", "/v1/images", files=[("files", "red.png", RED), ("files", "blue.png", BLUE)],
              fields={"metadata": json.dumps({"source": "smoke"})}, expect=(200, 201))
    ids = [item["id"] for item in up["items"]]
    check(len(ids) == 2 and len(set(ids)) == 2, f"two images stored: ids {ids}")
    again = call("POST", "/v1/images", files=[("files", "red-again.png", RED)], expect=(200, 201))
    check(again["items"][0]["id"] == ids[0] and again["items"][0]["duplicate"] is True,
          "identical bytes return the existing id, duplicate=true")
    state = {"ids": ids, "sha": [hashlib.sha256(RED).hexdigest(), hashlib.sha256(BLUE).hexdigest()]}
    json.dump(state, open(state_path, "w"))
else:
    state = json.load(open(state_path))
    ids = state["ids"]

listing = call("GET", "/v1/images?limit=10")
check(listing["total"] == 2 and sorted(i["id"] for i in listing["items"]) == sorted(ids),
      f"GET /v1/images lists the two images (total {listing['total']})")
for image_id, sha in zip(ids, state["sha"]):
    content = call("GET", f"/v1/images/{image_id}/content")
    check(hashlib.sha256(content).hexdigest() == sha, f"image {image_id} content is intact")
    thumb = call("GET", f"/v1/images/{image_id}/thumbnail")
    check(len(thumb) > 0, f"image {image_id} has a thumbnail")
res = call("POST", "/v1/search/text", json_body={"query": "a red square", "k": 5, "filter": None, "rerank": False})
check(sorted(ids_of(res)) == sorted(ids), f"text search finds both images: {ids_of(res)} in {res.get('took_ms')} ms")
res = call("POST", "/v1/search/image", files=[("file", "q.png", BLUE)], fields={"k": "2"})
check(ids_of(res)[:1] == [ids[1]], f"image search by upload ranks the same image first: {ids_of(res)}")
res = call("POST", "/v1/search/image", fields={"image_id": str(ids[0]), "k": "2"})
check(ids[0] in ids_of(res), f"image search by image_id: {ids_of(res)}")
res = call("POST", "/v1/search/text", json_body={"query": "", "k": 5}, expect=(422,))
check(isinstance(res, dict) and "error" in res, "an empty query answers 422 with the error body")
PY

quiet podman volume create "$VOL"

log "run 1: fresh container on volume $VOL"
run_container
wait_ready
uid=$(podman exec "$NAME" id -u)
[ "$uid" != 0 ] || fail "the server runs as root"
log "server runs as uid $uid"
python3 "$WORK/check.py" "$BASE" first "$WORK/state.json" || fail "checks on the fresh container"
if podman healthcheck run "$NAME" >/dev/null 2>&1; then
  log "HEALTHCHECK passes"
else
  fail "HEALTHCHECK failed (or the image was built without it)"
fi

log "run 2: podman restart"
quiet podman restart "$NAME" || fail "podman restart"
wait_ready
python3 "$WORK/check.py" "$BASE" again "$WORK/state.json" || fail "checks after restart"

log "run 3: container removed and re-created on the same volume"
quiet podman rm -f "$NAME" || fail "podman rm"
run_container
wait_ready
python3 "$WORK/check.py" "$BASE" again "$WORK/state.json" || fail "checks after re-creation"

size=$(podman image inspect --format '{{.Size}}' "$TAG")
log "image $TAG size: $size bytes ($(numfmt --to=iec-i --suffix=B "$size" 2>/dev/null || echo "?"))"
