"""Settings: precedence, conversion, and one clear error per bad value."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from changerelay import config as cfg
from changerelay.pipeline import change_stream_stages, redaction_stages

ROOT = Path(__file__).resolve().parent.parent


def load(argv=(), env=None, dotenv=None, tmp_path=None):
    path = None
    if dotenv is not None:
        path = tmp_path / ".env"
        path.write_text(dotenv)
    return cfg.load(list(argv), env or {}, dotenv_path=path)


def test_defaults_match_the_documented_table():
    c = load()
    assert (c.mongo_uri, c.host, c.port, c.full_document) == (
        "mongodb://localhost:27017", "127.0.0.1", 8000, "updateLookup")
    assert (c.watch_db, c.watch_collection, c.pipeline) == (None, None, ())
    assert (c.log_level, c.log_format, c.scope) == ("INFO", "text", "deployment")
    assert (c.replay_buffer, c.client_buffer_bytes) == (10000, 8 * 1024 * 1024)


def test_images_settings():
    c = load()
    assert (c.full_document, c.full_document_before_change) == ("updateLookup", "off")
    c = load(env={"WATCH_DB": "shop", "WATCH_COLLECTION": "notes", "FULL_DOCUMENT": "required",
                  "FULL_DOCUMENT_BEFORE_CHANGE": "required"})
    assert (c.full_document, c.full_document_before_change) == ("required", "required")
    c = load(env={"FULL_DOCUMENT": "whenAvailable", "FULL_DOCUMENT_BEFORE_CHANGE": "whenAvailable"})
    assert "fullDocumentBeforeChange=whenAvailable" in cfg.describe(c)


def test_flag_beats_env_beats_dotenv(tmp_path):
    c = load(["--port", "9001"], {"PORT": "9002"}, "PORT=9003\nWATCH_DB=fromdotenv\n", tmp_path)
    assert c.port == 9001 and c.watch_db == "fromdotenv"
    c = load([], {"PORT": "9002"}, "PORT=9003\n", tmp_path)
    assert c.port == 9002
    c = load([], {}, "PORT=9003\n", tmp_path)
    assert c.port == 9003


def test_mongodb_uri_alias_and_mongo_srv_wins():
    assert load(env={"MONGODB_URI": "mongodb://a:1"}).mongo_uri == "mongodb://a:1"
    c = load(env={"MONGODB_URI": "mongodb://a:1", "MONGO_SRV": "mongodb://b:2"})
    assert c.mongo_uri == "mongodb://b:2"


def test_scopes():
    assert load(env={"WATCH_DB": "shop"}).scope == "database"
    assert load(env={"WATCH_DB": "shop", "WATCH_COLLECTION": "orders"}).scope == "collection"


def test_pipeline_that_keeps_id_is_fine():
    c = load(env={"PIPELINE": '[{"$project": {"fullDocument": 1, "operationType": 1}}]'})
    assert c.pipeline[0]["$project"]["fullDocument"] == 1


def test_split_large_event_is_allowed_as_the_last_stage_and_runs_after_redaction():
    c = load(env={"PIPELINE": '[{"$match": {}}, {"$changeStreamSplitLargeEvent": {}}]',
                  "REDACT": "fullDocument.secret"})
    stages = change_stream_stages(c.pipeline, c.redact)
    assert stages[0] == {"$match": {}}
    assert stages[1:-1] == redaction_stages(c.redact)  # MongoDB: the split must be the last
    assert stages[-1] == {"$changeStreamSplitLargeEvent": {}}
    plain = load(env={"PIPELINE": '[{"$match": {}}]', "REDACT": "fullDocument.secret"})
    assert change_stream_stages(plain.pipeline, plain.redact) == [
        {"$match": {}}, *redaction_stages(plain.redact)]


def test_pipeline_is_parsed_as_extended_json():
    c = load(env={"PIPELINE": '[{"$match": {"operationType": "insert"}}, {"$unset": "x"}]'})
    assert c.pipeline == ({"$match": {"operationType": "insert"}}, {"$unset": "x"})


@pytest.mark.parametrize("env, setting, words", [
    ({"PORT": "eighty"}, "PORT", "whole number"),
    ({"PORT": "70000"}, "PORT", "between 0 and 65535"),
    ({"WATCH_COLLECTION": "orders"}, "WATCH_COLLECTION", "WATCH_DB"),
    ({"PIPELINE": "[{"}, "PIPELINE", "not valid JSON"),
    ({"PIPELINE": '{"$match": {}}'}, "PIPELINE", "JSON array"),
    ({"PIPELINE": '[{"$lookup": {}}]'}, "PIPELINE", "$lookup"),
    ({"PIPELINE": '[{"$match": {}, "$project": {}}]'}, "PIPELINE", "exactly one key"),
    ({"PIPELINE": '[{"$project": {"_id": 0}}]'}, "PIPELINE", "resume token"),
    ({"PIPELINE": '[{"$unset": "_id"}]'}, "PIPELINE", "resume token"),
    ({"PIPELINE": '[{"$set": {"_id._data": "x"}}]'}, "PIPELINE", "resume token"),
    ({"PIPELINE": '[{"$changeStreamSplitLargeEvent": {}}, {"$match": {}}]'}, "PIPELINE",
     "last stage"),
    ({"PIPELINE": '[{"$changeStreamSplitLargeEvent": {"x": 1}}]'}, "PIPELINE", "{}"),
    ({"FULL_DOCUMENT": "always"}, "FULL_DOCUMENT", "updateLookup"),
    ({"FULL_DOCUMENT_BEFORE_CHANGE": "on"}, "FULL_DOCUMENT_BEFORE_CHANGE", "whenAvailable"),
    ({"FULL_DOCUMENT": "required"}, "FULL_DOCUMENT", "WATCH_COLLECTION"),
    ({"FULL_DOCUMENT": "required", "WATCH_DB": "shop"}, "FULL_DOCUMENT", "47"),
    ({"FULL_DOCUMENT_BEFORE_CHANGE": "required", "WATCH_DB": "shop"},
     "FULL_DOCUMENT_BEFORE_CHANGE", "WATCH_COLLECTION"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT", "text, json"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL", "DEBUG"),
    ({"MONGO_SRV": "postgres://x"}, "MONGO_SRV", "mongodb://"),
    ({"MONGO_SRV": "mongodb+srv://a:1,b:2/"}, "MONGO_SRV", "exactly one host"),
    ({"WATCH_DB": "a.b"}, "WATCH_DB", "not a valid database name"),
    ({"WATCH_DB": "é" * 32}, "WATCH_DB", "63 bytes"),
    ({"WATCH_DB": "shop", "WATCH_COLLECTION": ".orders"}, "WATCH_COLLECTION", "'.'"),
    ({"WATCH_DB": "shop", "WATCH_COLLECTION": "system.views"}, "WATCH_COLLECTION", "system."),
    ({"WATCH_DB": "shop", "WATCH_COLLECTION": "c" * 251}, "WATCH_COLLECTION", "255 bytes"),
    ({"ALLOWED_ORIGINS": "example.com"}, "ALLOWED_ORIGINS", "scheme://host"),
    ({"TRUSTED_PROXIES": "proxy.local"}, "TRUSTED_PROXIES", "IP address"),
    ({"REDACT": "_id"}, "REDACT", "resume token"),
    ({"WS_COMPRESSION": "maybe"}, "WS_COMPRESSION", "boolean"),
    ({"AUTH_JWT_PUBLIC_KEY": "/nonexistent.pem"}, "AUTH_JWT_PUBLIC_KEY", "PEM"),
    ({"AUTH_JWT_SECRET": "s", "AUTH_JWT_PUBLIC_KEY": __file__}, "AUTH_JWT_SECRET", "not both"),
])
def test_bad_values_name_the_setting_and_the_fix(env, setting, words):
    with pytest.raises(cfg.ConfigError) as info:
        load(env=env)
    assert info.value.setting == setting
    assert words in str(info.value)


def test_password_never_in_errors_or_descriptions():
    uri = "mongodb://alice:s3cret@db.example:99999/"
    with pytest.raises(cfg.ConfigError) as info:
        load(env={"MONGO_SRV": uri})
    assert "s3cret" not in str(info.value)
    c = load(env={"MONGO_SRV": "mongodb://alice:s3cret@db.example/?replicaSet=rs0"})
    assert "s3cret" not in cfg.describe(c) and "alice:***@" in c.redacted_uri


@pytest.mark.parametrize("argv, env", [
    (["--port", "x"], {}),
    ([], {"PIPELINE": "nope"}),
    (["--no-such-flag"], {}),
    ([], {"WATCH_COLLECTION": "c"}),
    ([], {"WATCH_DB": "shop", "FULL_DOCUMENT": "required"}),
])
def test_server_exits_2_with_one_line_and_no_traceback(argv, env):
    result = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *argv], cwd=ROOT, capture_output=True,
        text=True, env={"PATH": "/usr/bin:/bin", **env}, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("changerelay: configuration error:")


def test_help_lists_every_setting():
    result = subprocess.run([sys.executable, str(ROOT / "server.py"), "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for name, spec in cfg._specs():
        assert spec.env in result.stdout, name


def test_env_example_documents_every_setting():
    text = (ROOT / ".env.example").read_text()
    for _name, spec in cfg._specs():
        assert f"{spec.env}=" in text, spec.env


SETTINGS = {field.name: field.metadata["spec"] for field in dataclasses.fields(cfg.Config)}


def test_every_setting_is_one_declaration_with_its_converter():
    """A setting's variable, default, help and converter are declared together (a second table
    of converters, keyed by field name, had to be kept in step with the fields)."""
    for field in dataclasses.fields(cfg.Config):
        assert callable(field.metadata["spec"].convert), field.name
    assert not hasattr(cfg, "_CONVERTERS")


def _as_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize("name", [name for name, setting in SETTINGS.items()
                                  if setting.default not in (None, ())])
def test_every_default_written_out_reads_back_as_itself(name):
    """Each setting's converter accepts its own default as an operator would write it."""
    setting = SETTINGS[name]
    config = load(env={setting.env: _as_text(setting.default)})
    assert getattr(config, name) == setting.default
