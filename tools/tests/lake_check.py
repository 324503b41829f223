"""Reads pgtrail exports the way a lake user would (DuckDB and pyarrow, hive partitioning) for
tools/tests/export.rs. Each command prints one JSON document on stdout.

  mkbucket ENDPOINT BUCKET              create a bucket on an S3-compatible server
  download ENDPOINT BUCKET PREFIX DIR   copy every object under PREFIX into DIR
  counts DIR LAYOUT                     rows and distinct change keys per table (pyarrow)
  iceberg DIR LAYOUT WAREHOUSE          register each table's files as an Iceberg table (pyiceberg,
                                        SQLite catalog, add_files) and count its rows by a scan
  asof DIR LAYOUT TABLE LSN|TIME EXPECTED.parquet
                                        the table at a moment from the export (DuckDB), compared
                                        with pgtrail's own as_of result
"""
import json
import sys


def s3():
    import boto3
    return boto3.client("s3", endpoint_url=sys.argv[2], aws_access_key_id="test",
                        aws_secret_access_key="test", region_name="us-east-1")


def main():
    cmd = sys.argv[1]
    if cmd == "mkbucket":
        s3().create_bucket(Bucket=sys.argv[3])
        print(json.dumps({"ok": True}))
    elif cmd == "download":
        import os
        client, bucket, prefix, out = s3(), sys.argv[3], sys.argv[4], sys.argv[5]
        names = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):].lstrip("/")
                path = os.path.join(out, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                client.download_file(bucket, obj["Key"], path)
                names.append(rel)
        print(json.dumps(sorted(names)))
    elif cmd == "counts":
        import pyarrow.dataset as ds
        root, layout = sys.argv[2], sys.argv[3]
        data = ds.dataset(root, format="parquet", partitioning="hive", exclude_invalid_files=False,
                          ignore_prefixes=["_pgtrail_export", "."]).to_table()
        import pyarrow as pa
        # A TRUNCATE's delete rows share one change key: cdf rows are told apart by content.
        flat = [f.name for f in data.schema if not pa.types.is_nested(f.type)]
        key = {"changes": ["lsn", "seq"], "cdf": flat, "scd2": flat, "snapshot": flat}[layout]
        result = {}
        for table in sorted(set(data.column("table").to_pylist())):
            rows = data.filter(ds.field("table") == table)
            keys = list(zip(*[rows.column(k).to_pylist() for k in key])) if key else []
            per = {"rows": rows.num_rows, "distinct": len(set(keys))}
            if layout == "cdf":
                types = rows.column("_change_type").to_pylist()
                per["types"] = {t: types.count(t) for t in sorted(set(types))}
            result[table] = per
        print(json.dumps(result))
    elif cmd == "iceberg":
        import glob
        import os
        import pyarrow.parquet as pq
        from pyiceberg.catalog.sql import SqlCatalog
        root, layout, warehouse = sys.argv[2:5]
        os.makedirs(warehouse, exist_ok=True)
        catalog = SqlCatalog("pgtrail", uri="sqlite:///%s/catalog.db" % warehouse,
                             warehouse="file://%s" % warehouse)
        catalog.create_namespace_if_not_exists(layout)
        result = {}
        for table_dir in sorted(glob.glob(os.path.join(root, "table=*"))):
            files = sorted(glob.glob(os.path.join(table_dir, "**", "*.parquet"), recursive=True))
            name = os.path.basename(table_dir)[len("table="):]
            # The newest file has every column (a column added later is null in older files).
            table = catalog.create_table("%s.%s" % (layout, name.replace(".", "__")),
                                         schema=pq.read_schema(files[-1]))
            table.add_files(files)
            result[name] = table.scan().to_arrow().num_rows
        print(json.dumps(result))
    elif cmd == "asof":
        import duckdb
        import pyarrow.parquet as pq
        root, layout, table, moment, expected_path = sys.argv[2:7]
        expected = pq.read_table(expected_path)
        columns = ", ".join('"%s"' % c for c in expected.column_names)
        glob = "%s/table=%s/**/*.parquet" % (root, table)
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'")
        source = "read_parquet('%s', hive_partitioning = true, union_by_name = true)" % glob
        if layout == "scd2":
            if moment.isdigit():
                where = "_valid_from_lsn <= %s AND (_valid_to_lsn > %s OR _valid_to_lsn IS NULL)" % (moment, moment)
            else:
                where = "_valid_from <= TIMESTAMPTZ '%s' AND (_valid_to > TIMESTAMPTZ '%s' OR _valid_to IS NULL)" % (moment, moment)
            query = "SELECT %s FROM %s WHERE %s" % (columns, source, where)
        else:
            query = "SELECT %s FROM %s WHERE snapshot_lsn = (SELECT max(snapshot_lsn) FROM %s)" % (columns, source, source)
        got = con.sql(query).to_arrow_table()
        norm = lambda rows: sorted(json.dumps(r, sort_keys=True, default=str) for r in rows)
        a, b = norm(got.to_pylist()), norm(expected.to_pylist())
        print(json.dumps({"equal": a == b, "rows": len(a), "expected_rows": len(b),
                          "only_export": [r for r in a if r not in b][:5],
                          "only_pgtrail": [r for r in b if r not in a][:5]}))
    else:
        raise SystemExit("unknown command " + cmd)


main()
