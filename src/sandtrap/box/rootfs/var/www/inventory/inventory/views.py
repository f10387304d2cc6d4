from flask import Blueprint, abort, redirect, render_template, request, session, url_for

from .db import get_db

bp = Blueprint("views", __name__)


@bp.route("/")
def index():
    if "user" not in session:
        return redirect(url_for("views.login"))
    return redirect(url_for("views.assets"))


@bp.route("/login", methods=["GET", "POST"])
def login():
    # LDAP bind happens in the reverse proxy; we only trust the header it sets.
    user = request.headers.get("X-Remote-User")
    if user:
        session["user"] = user
        return redirect(url_for("views.assets"))
    return render_template("base.html", message="Please sign in via SSO.")


@bp.route("/assets")
def assets():
    if "user" not in session:
        return redirect(url_for("views.login"))
    page = max(int(request.args.get("page", 1)), 1)
    with get_db().cursor() as cur:
        cur.execute(
            "SELECT id, tag, hostname, owner, location, updated_at FROM assets "
            "ORDER BY updated_at DESC LIMIT 50 OFFSET %s",
            ((page - 1) * 50,),
        )
        rows = cur.fetchall()
    return render_template("assets.html", assets=rows, page=page)


@bp.route("/assets/<int:asset_id>")
def asset(asset_id):
    with get_db().cursor() as cur:
        cur.execute("SELECT * FROM assets WHERE id = %s", (asset_id,))
        row = cur.fetchone()
    if row is None:
        abort(404)
    return render_template("assets.html", assets=[row], page=1)


@bp.route("/admin/")
def admin():
    if session.get("user") not in ("jkeller", "pnair", "admin"):
        abort(403)
    with get_db().cursor() as cur:
        cur.execute("SELECT id, username, role, last_login FROM users ORDER BY username")
        users = cur.fetchall()
    return render_template("assets.html", assets=users, page=1)
