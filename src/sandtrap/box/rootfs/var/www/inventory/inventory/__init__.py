import configparser
import os

from dotenv import load_dotenv
from flask import Flask

BASE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def create_app():
    load_dotenv(os.path.join(BASE_DIR, ".env"))
    settings = configparser.ConfigParser()
    settings.read(os.path.join(BASE_DIR, "config", "settings.ini"))

    app = Flask(
        __name__, template_folder=os.path.join(BASE_DIR, "templates"), static_folder=os.path.join(BASE_DIR, "static")
    )
    app.config["SECRET_KEY"] = os.environ["SECRET_KEY"]
    app.config["SETTINGS"] = settings

    from . import api, db, views

    db.init_app(app)
    app.register_blueprint(views.bp)
    app.register_blueprint(api.bp, url_prefix="/api/v1")
    return app
