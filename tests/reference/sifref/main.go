// Command sifref makes SIF images with the reference SIF library (github.com/sylabs/sif/v2, as
// Debian's golang-github-sylabs-sif-dev ships it), shaped the way Apptainer's builder shapes an
// (encrypted) image, and the keys such images use. The tests compare spank-sif's SIF reader,
// writer and key unwrapping with what it makes: it shares no code with spank-sif.
//
//	sifref build -o IMAGE -part PAYLOAD [-fs squashfs|encrypted|ext3|raw] [-parttype N]
//	             [-arch NAME] [-deffile FILE] [-json NAME=FILE]... [-pem-pub PUBLIC -key KEYFILE]
//	             [-id UUID] [-time UNIXSECONDS]
//	sifref genkey -priv PRIVATE -pub PUBLIC [-bits N]
//	sifref randkey -o FILE [-n BYTES]
//
// An image made by build holds these objects, all in object group 1, numbered 1, 2, ... in this
// order (as docs/formats.md describes Apptainer's layout):
//   - the definition file, if -deffile is given;
//   - one generic JSON object per -json, in name order whatever the order of the flags;
//   - the primary partition: PAYLOAD, with the file system type, partition type and architecture
//     given, aligned to 4 KiB (the library's default for partitions);
//   - with -pem-pub: a crypto message (format PEM, message type RSA-OAEP) linked to the partition,
//     holding the content of KEYFILE wrapped for the public key (see wrapKey).
//
// -id and -time fix the image ID and the time of the image and its objects (otherwise a random ID
// and now), so that the same inputs make the same image wherever it is built.
package main

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/sylabs/sif/v2/pkg/sif"
)

// The launch script image builders write at the start of every image.
const launchScript = "#!/usr/bin/env run-singularity\n"

var fsTypes = map[string]sif.FSType{
	"squashfs":  sif.FsSquash,
	"encrypted": sif.FsEncryptedSquashfs, // a LUKS2 volume holding a squashfs
	"ext3":      sif.FsExt3,
	"raw":       sif.FsRaw,
}

func main() {
	commands := map[string]func([]string) error{"build": build, "genkey": genkey, "randkey": randkey}
	if len(os.Args) < 2 || commands[os.Args[1]] == nil {
		fmt.Fprintln(os.Stderr, "usage: sifref build|genkey|randkey [flags] (-h for a command's flags)")
		os.Exit(2)
	}
	if err := commands[os.Args[1]](os.Args[2:]); err != nil {
		fmt.Fprintf(os.Stderr, "sifref %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

// jsonFlags collects repeated -json NAME=FILE flags.
type jsonFlags map[string]string

func (j jsonFlags) String() string { return fmt.Sprint(map[string]string(j)) }

func (j jsonFlags) Set(value string) error {
	name, file, ok := strings.Cut(value, "=")
	if !ok || name == "" || file == "" {
		return errors.New("want NAME=FILE")
	}
	j[name] = file
	return nil
}

func build(args []string) error {
	flags := flag.NewFlagSet("build", flag.ExitOnError)
	out := flags.String("o", "", "the image to write")
	part := flags.String("part", "", "the partition's content (a squashfs, or a LUKS2 volume)")
	fsName := flags.String("fs", "squashfs", "file system type: squashfs, encrypted, ext3 or raw")
	partType := flags.Int("parttype", int(sif.PartPrimSys), "partition type (2: primary system)")
	arch := flags.String("arch", "amd64", "the partition's architecture (Go name)")
	deffile := flags.String("deffile", "", "a definition file to store")
	publicKey := flags.String("pem-pub", "", "PKCS#1 RSA public key to wrap -key for")
	keyFile := flags.String("key", "", "the raw key to wrap (the LUKS passphrase of a PEM image)")
	imageID := flags.String("id", "", "the image ID (a UUID; default: a random one)")
	unixTime := flags.Int64("time", -1, "the time of the image and its objects, in Unix seconds (default: now)")
	jsons := jsonFlags{}
	flags.Var(jsons, "json", "NAME=FILE: a generic JSON object (repeatable)")
	flags.Parse(args)

	fsType, known := fsTypes[*fsName]
	switch {
	case *out == "" || *part == "":
		return errors.New("-o and -part are required")
	case !known:
		return fmt.Errorf("unknown -fs %q", *fsName)
	case (*publicKey == "") != (*keyFile == ""):
		return errors.New("-pem-pub and -key go together")
	}

	var inputs []sif.DescriptorInput
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	add := func(dataType sif.DataType, path string, opts ...sif.DescriptorInputOpt) error {
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		files = append(files, f)
		return addInput(&inputs, dataType, f, opts...)
	}

	if *deffile != "" {
		if err := add(sif.DataDeffile, *deffile); err != nil {
			return err
		}
	}
	names := make([]string, 0, len(jsons))
	for name := range jsons {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if err := add(sif.DataGenericJSON, jsons[name], sif.OptObjectName(name)); err != nil {
			return err
		}
	}
	if err := add(sif.DataPartition, *part,
		sif.OptPartitionMetadata(fsType, sif.PartType(*partType), *arch)); err != nil {
		return err
	}
	// A new image numbers its objects 1, 2, ... in the order given: the partition is the last so far.
	partitionID := uint32(len(inputs))
	if *publicKey != "" {
		message, err := wrapKeyFile(*publicKey, *keyFile)
		if err != nil {
			return err
		}
		if err := addInput(&inputs, sif.DataCryptoMessage, bytes.NewReader(message),
			sif.OptLinkedID(partitionID),
			sif.OptCryptoMessageMetadata(sif.FormatPEM, sif.MessageRSAOAEP)); err != nil {
			return err
		}
	}

	opts := []sif.CreateOpt{sif.OptCreateWithLaunchScript(launchScript), sif.OptCreateWithDescriptors(inputs...)}
	if *imageID != "" {
		opts = append(opts, sif.OptCreateWithID(*imageID))
	}
	if *unixTime >= 0 {
		opts = append(opts, sif.OptCreateWithTime(time.Unix(*unixTime, 0)))
	}
	image, err := sif.CreateContainerAtPath(*out, opts...)
	if err != nil {
		return err
	}
	return image.UnloadContainer()
}

func addInput(inputs *[]sif.DescriptorInput, dataType sif.DataType, r io.Reader,
	opts ...sif.DescriptorInputOpt) error {
	input, err := sif.NewDescriptorInput(dataType, r, opts...) // default group: 1
	if err != nil {
		return err
	}
	*inputs = append(*inputs, input)
	return nil
}

func wrapKeyFile(publicPath, keyPath string) ([]byte, error) {
	text, err := os.ReadFile(publicPath)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(text)
	if block == nil {
		return nil, fmt.Errorf("%s: no PEM block", publicPath)
	}
	public, err := x509.ParsePKCS1PublicKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", publicPath, err)
	}
	key, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, err
	}
	return wrapKey(public, key)
}

// wrapKey returns the crypto message Apptainer (1.2 and later) stores for key: RSA-OAEP with SHA-256
// as both the OAEP hash and the MGF1 hash and an empty label, applied to consecutive pieces of key
// of at most k-66 bytes (k: the modulus size in bytes; 66 = 2*32+2 is OAEP's overhead with SHA-256),
// the ciphertexts (k bytes each) concatenated, DER-encoded as one OCTET STRING and PEM-armoured as
// a "MESSAGE" block. A 64-byte key under a 2048-bit or larger key is a single piece.
func wrapKey(public *rsa.PublicKey, key []byte) ([]byte, error) {
	piece := public.Size() - 2*sha256.Size - 2
	if piece <= 0 {
		return nil, fmt.Errorf("a %d-bit RSA key is too small for OAEP with SHA-256", public.N.BitLen())
	}
	var ciphertext []byte
	for len(key) > 0 {
		n := piece
		if n > len(key) {
			n = len(key)
		}
		c, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, public, key[:n], nil)
		if err != nil {
			return nil, err
		}
		ciphertext = append(ciphertext, c...)
		key = key[n:]
	}
	der, err := asn1.Marshal(ciphertext) // a []byte marshals as an OCTET STRING
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "MESSAGE", Bytes: der}), nil
}

func genkey(args []string) error {
	flags := flag.NewFlagSet("genkey", flag.ExitOnError)
	privatePath := flags.String("priv", "", "where to write the private key (PKCS#1 PEM)")
	publicPath := flags.String("pub", "", "where to write the public key (PKCS#1 PEM)")
	bits := flags.Int("bits", 2048, "modulus size in bits")
	flags.Parse(args)
	if *privatePath == "" || *publicPath == "" {
		return errors.New("-priv and -pub are required")
	}
	private, err := rsa.GenerateKey(rand.Reader, *bits)
	if err != nil {
		return err
	}
	// PKCS#1 both ways: the only encodings Apptainer accepts for --pem-path.
	privatePEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(private)})
	publicPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PUBLIC KEY", Bytes: x509.MarshalPKCS1PublicKey(&private.PublicKey)})
	if err := os.WriteFile(*privatePath, privatePEM, 0o600); err != nil {
		return err
	}
	return os.WriteFile(*publicPath, publicPEM, 0o644)
}

func randkey(args []string) error {
	flags := flag.NewFlagSet("randkey", flag.ExitOnError)
	out := flags.String("o", "", "where to write the key")
	size := flags.Int("n", 64, "bytes (Apptainer's PEM images use 64)")
	flags.Parse(args)
	if *out == "" || *size <= 0 {
		return errors.New("-o and a positive -n are required")
	}
	key := make([]byte, *size)
	if _, err := rand.Read(key); err != nil {
		return err
	}
	return os.WriteFile(*out, key, 0o600)
}
