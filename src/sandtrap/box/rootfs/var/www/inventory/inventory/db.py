import pymysql
from flask import current_app, g


def get_db():
    if "db" not in g:
        cfg = current_app.config["SETTINGS"]["database"]
        g.db = pymysql.connect(
            host=cfg["host"],
            port=cfg.getint("port", 3306),
            user=cfg["user"],
            password=cfg["password"],
            database=cfg["name"],
            cursorclass=pymysql.cursors.DictCursor,
            autocommit=True,
        )
    return g.db


def close_db(_exc=None):
    db = g.pop("db", None)
    if db is not None:
        db.close()


def init_app(app):
    app.teardown_appcontext(close_db)
