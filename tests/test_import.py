"""`imgsvc import`: a folder tree (resumable, failures reported without stopping) and the image column of
an existing app's table (bytea, base64, data: URIs), with the old id -> new id mapping as CSV."""

from __future__ import annotations

import base64
import csv
import io
import shutil
from pathlib import Path

import asyncpg

from tests.conftest import FLICKR, GIF_ANIMATED, PNG_ALPHA, WEBP_ANIMATED
from tests.test_config import run_cli


def env_for(database_url: str, tmp_path: Path) -> dict[str, str]:
    return {"IMGSVC_DATABASE_URL": database_url, "IMGSVC_STORAGE_URL": f"file://{tmp_path}/blobs"}


async def owners_and_formats(database_url: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT owner, format FROM images WHERE deleted_at IS NULL ORDER BY owner, format")
        return [(r["owner"], r["format"]) for r in rows]
    finally:
        await conn.close()


async def test_folder_import_reports_failures_and_resumes(database_url: str, tmp_path: Path) -> None:
    tree = tmp_path / "photos"
    (tree / "2024" / "june").mkdir(parents=True)
    shutil.copy(FLICKR, tree / "a.jpg")
    shutil.copy(PNG_ALPHA, tree / "2024" / "b.png")
    shutil.copy(GIF_ANIMATED, tree / "2024" / "june" / "c.gif")
    shutil.copy(FLICKR, tree / "2024" / "june" / "same-as-a.JPG")
    (tree / "2024" / "broken.jpg").write_bytes(b"not an image at all")
    (tree / "notes.txt").write_text("ignored: not an image suffix")
    env = env_for(database_url, tmp_path)

    first = run_cli("import", str(tree), "--owner", "alice", "--category", "archive", env=env)
    assert first.returncode == 1  # one file failed, the others went in
    rows = list(csv.DictReader(io.StringIO(first.stdout)))
    assert sorted(r["status"] for r in rows) == ["failed", "imported", "imported", "imported", "imported"]
    assert "broken.jpg: 415 unsupported-format" in first.stderr
    assert "imported 4, skipped 0 (imported before), failed 1" in first.stderr
    # Every file is its own image; the two copies of one photo share one blob.
    assert await owners_and_formats(database_url) == [("alice", "gif"), ("alice", "jpeg"), ("alice", "jpeg"),
                                                      ("alice", "png")]  # fmt: skip
    assert len([p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]) == 3
    first_ids = {r["old_id"]: r["new_id"] for r in rows}

    (tree / "2024" / "broken.jpg").unlink()
    shutil.copy(WEBP_ANIMATED, tree / "d.webp")
    again = run_cli("import", str(tree), "--owner", "alice", "--category", "archive", env=env)
    assert again.returncode == 0, again.stderr
    assert "imported 1, skipped 4 (imported before), failed 0" in again.stderr
    rows = {r["old_id"]: r for r in csv.DictReader(io.StringIO(again.stdout))}
    assert all(rows[k]["new_id"] == v for k, v in first_ids.items() if v)  # the same ids, nothing duplicated
    assert len(await owners_and_formats(database_url)) == 5

    # The same folder reached by another path is the same source; a file changed since is refused, not duplicated.
    (tree / "a.jpg").write_bytes(PNG_ALPHA.read_bytes())
    relative = run_cli("import", str(tree / "2024" / ".." / "a.jpg"), "--owner", "alice", "--category", "archive",
                       env=env)  # fmt: skip
    assert relative.returncode == 1
    assert "422 idempotency-key-reused" in relative.stderr
    assert len(await owners_and_formats(database_url)) == 5


async def test_sql_import_of_bytea_base64_and_data_uris(database_url: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "CREATE TABLE legacy_avatars (user_id int, username text, photo_bytea bytea, photo_b64 text)"
        )
        png_b64 = base64.b64encode(PNG_ALPHA.read_bytes()).decode()
        await conn.executemany(
            "INSERT INTO legacy_avatars VALUES ($1, $2, $3, $4)",
            [
                (1, "ann", FLICKR.read_bytes(), None),
                (2, "ben", None, png_b64),
                (3, "cat", None, "data:image/gif;base64," + base64.b64encode(GIF_ANIMATED.read_bytes()).decode()),
                (4, "dan", None, "!!! not base64 !!!"),
                (5, "eve", None, base64.b64encode(b"plain text, not an image").decode()),
            ],
        )
    finally:
        await conn.close()
    env = env_for(database_url, tmp_path)
    columns = "SELECT user_id AS id, username AS owner, {} AS data FROM legacy_avatars WHERE {} IS NOT NULL"
    bytea_query = columns.format("photo_bytea", "photo_bytea")
    from_bytea = run_cli("import", "--sql", bytea_query, "--dsn", database_url, env=env)
    assert from_bytea.returncode == 0, from_bytea.stderr
    result = run_cli("import", "--sql", columns.format("photo_b64", "photo_b64"), "--dsn", database_url, env=env)
    result.stdout = from_bytea.stdout + result.stdout.split("\n", 1)[1]
    assert result.returncode == 1  # two rows are not images
    rows = {r["old_id"]: r for r in csv.DictReader(io.StringIO(result.stdout))}
    assert {k: v["status"] for k, v in rows.items()} == {
        "1": "imported", "2": "imported", "3": "imported", "4": "failed", "5": "failed"
    }  # fmt: skip
    assert all(len(rows[k]["new_id"]) == 22 for k in ("1", "2", "3")) and rows["4"]["new_id"] == ""
    assert "4: undecodable data column" in result.stderr and "5: 415 unsupported-format" in result.stderr
    assert await owners_and_formats(database_url) == [("ann", "jpeg"), ("ben", "png"), ("cat", "gif")]

    rerun = run_cli("import", "--sql", bytea_query, "--dsn", database_url, env=env)  # resumes: nothing new
    assert rerun.returncode == 0 and "imported 0, skipped 1 (imported before)" in rerun.stderr
    assert next(csv.DictReader(io.StringIO(rerun.stdout)))["new_id"] == rows["1"]["new_id"]
    assert len(await owners_and_formats(database_url)) == 3


def test_a_failing_query_is_a_clear_error(database_url: str, tmp_path: Path) -> None:
    result = run_cli("import", "--sql", "SELECT nope FROM nowhere", "--dsn", database_url,
                     env=env_for(database_url, tmp_path))  # fmt: skip
    assert result.returncode == 2
    assert "the --sql query failed" in result.stderr and "Traceback" not in result.stderr
