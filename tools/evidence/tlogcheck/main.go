// tlogcheck checks pgtrail's Merkle tree hashes and proofs with Go's golang.org/x/mod/sumdb/tlog
// (the transparency log code of the Go checksum database), which nobody on pgtrail wrote.
//
// Build (GOPATH mode, with Debian's golang-go and golang-golang-x-mod-dev; nothing downloaded):
//
//	mkdir -p gopath/src && cp -r tools/evidence/tlogcheck gopath/src/
//	GO111MODULE=off GOPATH=$PWD/gopath:/usr/share/gocode go build -o tlogcheck tlogcheck
//
// Input on stdin, one item a line, hashes and data in hex:
//
//	leaf DATA             the next leaf's bytes (its hash is tlog.RecordHash(DATA))
//	root N HASH           the root of the first N leaves
//	inclusion N I P1,P2…  the proof that leaf I is in the tree of N leaves
//	consistency M N P1,…  the proof that the tree of M leaves is a prefix of the tree of N
//	vkey KEY              the verifier key of the notes that follow (golang.org/x/mod/sumdb/note)
//	checkpoint NOTE       a signed checkpoint (the note in base64): its signature by the key,
//	                      and its root against the root of its size
//
// Prints "ok: R roots, I inclusion proofs, C consistency proofs, K checkpoints" and exits 0, or prints the first
// item that does not check and exits 1.
package main

import (
	"bufio"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

func fail(format string, args ...interface{}) {
	fmt.Printf("FAIL: "+format+"\n", args...)
	os.Exit(1)
}

func hash(text string) tlog.Hash {
	var h tlog.Hash
	b, err := hex.DecodeString(text)
	if err != nil || len(b) != len(h) {
		fail("not a hash: %q", text)
	}
	copy(h[:], b)
	return h
}

func hashes(text string) []tlog.Hash {
	var out []tlog.Hash
	for _, t := range strings.Split(text, ",") {
		if t != "" {
			out = append(out, hash(t))
		}
	}
	return out
}

func number(text string) int64 {
	n, err := strconv.ParseInt(text, 10, 64)
	if err != nil {
		fail("not a number: %q", text)
	}
	return n
}

func main() {
	var stored []tlog.Hash
	var records []tlog.Hash
	reader := tlog.HashReaderFunc(func(indexes []int64) ([]tlog.Hash, error) {
		out := make([]tlog.Hash, len(indexes))
		for i, x := range indexes {
			out[i] = stored[x]
		}
		return out, nil
	})
	// The root of a tree size, as tlog computes it from the stored hashes.
	rootOf := func(n int64) tlog.Hash {
		if n > int64(len(records)) {
			fail("a tree of %d leaves, only %d given", n, len(records))
		}
		h, err := tlog.TreeHash(n, reader)
		if err != nil {
			fail("tree hash of %d: %v", n, err)
		}
		return h
	}
	roots, inclusions, consistencies, checkpoints := 0, 0, 0, 0
	var verifier note.Verifier
	input := bufio.NewScanner(os.Stdin)
	input.Buffer(make([]byte, 1<<20), 1<<26)
	for input.Scan() {
		f := strings.Fields(input.Text())
		if len(f) == 0 {
			continue
		}
		switch {
		case f[0] == "leaf" && len(f) <= 2:
			data := []byte{}
			if len(f) == 2 {
				var err error
				if data, err = hex.DecodeString(f[1]); err != nil {
					fail("not hex: %q", f[1])
				}
			}
			hs, err := tlog.StoredHashes(int64(len(records)), data, reader)
			if err != nil {
				fail("storing leaf %d: %v", len(records), err)
			}
			stored = append(stored, hs...)
			records = append(records, tlog.RecordHash(data))
		case f[0] == "root" && len(f) == 3:
			n := number(f[1])
			if rootOf(n) != hash(f[2]) {
				fail("the root of %d leaves differs: tlog says %x", n, rootOf(n))
			}
			roots++
		case f[0] == "inclusion" && (len(f) == 3 || len(f) == 4):
			n, i := number(f[1]), number(f[2])
			proof := []tlog.Hash{}
			if len(f) == 4 {
				proof = hashes(f[3])
			}
			if err := tlog.CheckRecord(proof, n, rootOf(n), i, records[i]); err != nil {
				fail("inclusion of leaf %d in %d: %v", i, n, err)
			}
			inclusions++
		case f[0] == "consistency" && (len(f) == 3 || len(f) == 4):
			m, n := number(f[1]), number(f[2])
			proof := []tlog.Hash{}
			if len(f) == 4 {
				proof = hashes(f[3])
			}
			if err := tlog.CheckTree(proof, n, rootOf(n), m, rootOf(m)); err != nil {
				fail("consistency of %d with %d: %v", m, n, err)
			}
			consistencies++
		case f[0] == "vkey" && len(f) == 2:
			v, err := note.NewVerifier(f[1])
			if err != nil {
				fail("verifier key %q: %v", f[1], err)
			}
			verifier = v
		case f[0] == "checkpoint" && len(f) == 2 && verifier != nil:
			msg, err := base64.StdEncoding.DecodeString(f[1])
			if err != nil {
				fail("not base64: %q", f[1])
			}
			n, err := note.Open(msg, note.VerifierList(verifier))
			if err != nil {
				fail("checkpoint %q: %v", msg, err)
			}
			// C2SP tlog-checkpoint: origin, size, base64 root.
			lines := strings.Split(strings.TrimSuffix(n.Text, "\n"), "\n")
			if len(lines) != 3 || lines[0] != verifier.Name() {
				fail("checkpoint text %q", n.Text)
			}
			size := number(lines[1])
			root, err := base64.StdEncoding.DecodeString(lines[2])
			if err != nil || len(root) != 32 {
				fail("checkpoint root %q", lines[2])
			}
			if got := rootOf(size); string(got[:]) != string(root) {
				fail("the checkpoint of %d leaves signs another root than the leaves give", size)
			}
			checkpoints++
		default:
			fail("cannot read the line %q", input.Text())
		}
	}
	if err := input.Err(); err != nil {
		fail("reading: %v", err)
	}
	fmt.Printf("ok: %d roots, %d inclusion proofs, %d consistency proofs, %d checkpoints\n",
		roots, inclusions, consistencies, checkpoints)
}
