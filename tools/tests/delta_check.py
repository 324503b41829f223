"""Reads pgtrail's Delta exports with Delta Lake readers pgtrail did not write, for
tools/tests/delta.rs: delta-rs's Python package (`deltalake`) and DuckDB's `delta` extension
(DuckDB 1.5.5 with the duckdb-extension-delta wheel, on PYTHONPATH when that command runs).
Each command prints one JSON document on stdout.

  tables ROOT                 per table (delta-rs): version, rows, live files, history, schema
  rows ROOT TABLE             a table's rows (delta-rs), the newest snapshot of a snapshot export
  counts ROOT LAYOUT          rows and distinct change keys per table (delta-rs), the shape of
                              lake_check.py's counts
  asof ROOT LAYOUT TABLE LSN|TIME|latest EXPECTED.parquet [VERSION]
                              the table at a moment from the Delta table (DuckDB's delta_scan;
                              with VERSION, delta-rs at that table version), compared with
                              pgtrail's own as_of result

ROOT is a directory or s3://bucket/prefix (then AWS_ENDPOINT_URL names the server).
"""
import json
import os
import sys


def storage_options(root):
    if not root.startswith("s3://"):
        return None
    return {"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"], "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


def table_roots(root):
    """(table name, table root) of every table under an export's root."""
    if root.startswith("s3://"):
        import boto3
        bucket, _, prefix = root[len("s3://"):].partition("/")
        client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                              aws_access_key_id="test", aws_secret_access_key="test",
                              region_name="us-east-1")
        found = client.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/", Delimiter="/")
        names = [p["Prefix"].rstrip("/").rsplit("/", 1)[1] for p in found.get("CommonPrefixes", [])]
    else:
        names = os.listdir(root)
    return [(n[len("table="):], root.rstrip("/") + "/" + n) for n in sorted(names) if n.startswith("table=")]


def delta_table(uri, version=None):
    import deltalake
    return deltalake.DeltaTable(uri, version=version, storage_options=storage_options(uri))


def main():
    cmd = sys.argv[1]
    if cmd == "tables":
        out = {}
        for name, uri in table_roots(sys.argv[2]):
            t = delta_table(uri)
            history = t.history()
            out[name] = {
                "version": t.version(),
                "rows": t.to_pyarrow_table().num_rows,
                "files": len(t.file_uris()),
                "operations": [h.get("operation") for h in history],
                "through": [h.get("pgtrail", {}).get("through_lsn") for h in history],
                "columns": [f.name for f in t.schema().fields],
                "partition_columns": t.metadata().partition_columns,
                "append_only": t.metadata().configuration.get("delta.appendOnly"),
            }
        print(json.dumps(out))
    elif cmd == "rows":
        # A table's rows as delta-rs reads them, values as text; for a snapshot export, the
        # newest snapshot only.
        rows = delta_table(dict(table_roots(sys.argv[2]))[sys.argv[3]]).to_pyarrow_table()
        if "_snapshot_lsn" in rows.column_names:
            import pyarrow.compute as pc
            rows = rows.filter(pc.equal(rows.column("_snapshot_lsn"), pc.max(rows.column("_snapshot_lsn"))))
        print(json.dumps(rows.to_pylist(), default=str))
    elif cmd == "counts":
        import pyarrow as pa
        root, layout = sys.argv[2], sys.argv[3]
        result = {}
        for name, uri in table_roots(root):
            rows = delta_table(uri).to_pyarrow_table()
            flat = [f.name for f in rows.schema if not pa.types.is_nested(f.type)]
            key = {"changes": ["lsn", "seq"]}.get(layout, flat)
            keys = list(zip(*[rows.column(k).to_pylist() for k in key]))
            per = {"rows": rows.num_rows, "distinct": len(set(keys))}
            if layout == "cdf":
                types = rows.column("_change_type").to_pylist()
                per["types"] = {t: types.count(t) for t in sorted(set(types))}
            result[name] = per
        print(json.dumps(result))
    elif cmd == "asof":
        import pyarrow.parquet as pq
        root, layout, table, moment, expected_path = sys.argv[2:7]
        version = int(sys.argv[7]) if len(sys.argv) > 7 else None
        expected = pq.read_table(expected_path)
        uri = dict(table_roots(root))[table]
        if version is not None:
            # delta-rs, at an older table version: its current rows (time travel).
            got = delta_table(uri, version).to_pyarrow_table()
            if layout == "scd2":
                got = got.filter(got.column("_is_current"))
            got = got.select(expected.column_names)
        else:
            import duckdb
            import duckdb_extension_delta
            ext = os.path.join(os.path.dirname(duckdb_extension_delta.__file__), "extensions",
                               "v" + duckdb.__version__, "delta.duckdb_extension")
            con = duckdb.connect()
            con.execute("SET autoinstall_known_extensions = false")
            con.execute("LOAD '%s'" % ext)
            con.execute("SET TimeZone = 'UTC'")
            columns = ", ".join('"%s"' % c for c in expected.column_names)
            source = "delta_scan('%s')" % uri
            if layout == "scd2":
                if moment.isdigit():
                    where = "_valid_from_lsn <= %s AND (_valid_to_lsn > %s OR _valid_to_lsn IS NULL)" % (moment, moment)
                else:
                    where = "_valid_from <= TIMESTAMPTZ '%s' AND (_valid_to > TIMESTAMPTZ '%s' OR _valid_to IS NULL)" % (moment, moment)
            else:
                where = "_snapshot_lsn = (SELECT max(_snapshot_lsn) FROM %s)" % source
            got = con.sql("SELECT %s FROM %s WHERE %s" % (columns, source, where)).to_arrow_table()
        norm = lambda rows: sorted(json.dumps(r, sort_keys=True, default=str) for r in rows)
        a, b = norm(got.to_pylist()), norm(expected.to_pylist())
        print(json.dumps({"equal": a == b, "rows": len(a), "expected_rows": len(b),
                          "only_export": [r for r in a if r not in b][:5],
                          "only_pgtrail": [r for r in b if r not in a][:5]}))
    else:
        raise SystemExit("unknown command " + cmd)


main()
sys.stdout.flush()
# delta-rs's runtime threads can abort the interpreter's normal exit ("terminate called without
# an active exception"): the answer is out, so leave at once.
os._exit(0)
