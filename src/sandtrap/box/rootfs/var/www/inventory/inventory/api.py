import hmac
import os

from flask import Blueprint, abort, jsonify, request

from .db import get_db

bp = Blueprint("api", __name__)


def _require_token():
    token = request.headers.get("X-Api-Token", "")
    if not hmac.compare_digest(token, os.environ.get("INTERNAL_API_TOKEN", "")):
        abort(401)


@bp.route("/assets")
def assets():
    with get_db().cursor() as cur:
        cur.execute("SELECT id, tag, hostname, location FROM assets ORDER BY id LIMIT 500")
        return jsonify(cur.fetchall())


@bp.route("/internal/sync", methods=["POST"])
def sync():
    _require_token()
    items = request.get_json(force=True) or []
    with get_db().cursor() as cur:
        for item in items:
            cur.execute(
                "REPLACE INTO assets (tag, hostname, owner, location) VALUES (%s, %s, %s, %s)",
                (item["tag"], item.get("hostname"), item.get("owner"), item.get("location")),
            )
    return jsonify({"synced": len(items)})


@bp.route("/internal/export")
def export():
    _require_token()
    with get_db().cursor() as cur:
        cur.execute("SELECT * FROM assets")
        return jsonify(cur.fetchall())
