// rehost-vcsim: govmomi's vCenter simulator with the behaviour rehost depends on added
// (real disk content, frozen base disks under snapshots, CBT, ExportVm, session-checked
// file access, fault injection). See README.md for the extensions and the control API.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"

	"github.com/vmware/govmomi/simulator"
)

var (
	datastoreDir string // the datastore's backing directory (--datastore-dir)
	workDir      string // scratch space for exports (--cert-dir/work)
	verbose      bool
)

func logf(format string, args ...interface{}) {
	if verbose {
		log.Printf(format, args...)
	}
}

func main() {
	port := flag.Int("port", 0, "HTTPS port on 127.0.0.1 (0: pick a free one)")
	controlPort := flag.Int("control-port", 0, "plain-HTTP control API port on 127.0.0.1 (0: pick a free one)")
	flag.StringVar(&datastoreDir, "datastore-dir", "", "directory backing datastore LocalDS_0 (required)")
	certDir := flag.String("cert-dir", "", "where ca.pem, cert.pem and thumbprint are written (default: <datastore-dir>/../certs)")
	username := flag.String("username", "user", "the only user name Login accepts")
	password := flag.String("password", "pass", "the only password Login accepts")
	vmsPerPool := flag.Int("vms", 2, "VMs per host/resource pool (the default model has 2 x 2 = 4 VMs)")
	clusterHosts := flag.Int("cluster-hosts", 3, "hosts in the cluster")
	hosts := flag.Int("hosts", 1, "standalone hosts")
	disks := flag.Int("disks", 1, "disks per VM (keys 2000, 2001, ...; 64 MiB each)")
	flag.BoolVar(&verbose, "verbose", false, "log emulator decisions to stderr")
	trace := flag.Bool("trace", false, "write SOAP traffic to stderr")
	flag.Parse()

	if err := run(*port, *controlPort, *certDir, *username, *password, *vmsPerPool, *clusterHosts, *hosts, *disks, *trace); err != nil {
		fmt.Fprintf(os.Stderr, "rehost-vcsim: %v\n", err)
		os.Exit(1)
	}
}

func run(port, controlPort int, certDir, username, password string, vmsPerPool, clusterHosts, hosts, disks int, trace bool) error {
	if datastoreDir == "" {
		return fmt.Errorf("--datastore-dir is required")
	}
	var err error
	if datastoreDir, err = filepath.Abs(datastoreDir); err != nil {
		return err
	}
	if err := os.MkdirAll(datastoreDir, 0o755); err != nil {
		return fmt.Errorf("creating datastore dir: %w", err)
	}
	if certDir == "" {
		certDir = filepath.Join(filepath.Dir(datastoreDir), "certs")
	}
	workDir = filepath.Join(certDir, "work")
	// Upstream creates its datastore directory under TMPDIR; give it a private one, then
	// move the files into --datastore-dir and point the datastore at it.
	scratch := filepath.Join(workDir, "tmp")
	if err := os.MkdirAll(scratch, 0o755); err != nil {
		return err
	}
	os.Setenv("TMPDIR", scratch)

	cert, thumbprint, err := makeCertificates(certDir)
	if err != nil {
		return fmt.Errorf("generating certificates: %w", err)
	}
	if !verbose {
		log.SetOutput(io.Discard) // upstream logs every fault it answers
	}
	simulator.Trace = trace

	model := simulator.VPX()
	model.Machine = vmsPerPool
	model.ClusterHost = clusterHosts
	model.Host = hosts
	if err := model.Create(); err != nil {
		return fmt.Errorf("creating the inventory: %w", err)
	}
	if err := adoptDatastore(); err != nil {
		return err
	}

	model.Service.Listen = &url.URL{Host: fmt.Sprintf("127.0.0.1:%d", port), User: url.UserPassword(username, password)}
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{*cert}, MinVersion: tls.VersionTLS12}
	model.Service.RegisterEndpoints = true
	server := model.Service.NewServer()
	serverBase = "https://" + server.Listener.Addr().String()
	serverThumbprint = thumbprint

	if err := addDisks(serverBase+"/sdk", model.Service.Listen.User, disks); err != nil {
		return err
	}
	renumberDisks()
	store.mu.Lock()
	err = store.reconcile()
	store.mu.Unlock()
	if err != nil {
		return fmt.Errorf("preparing disks: %w", err)
	}

	control := newControlMux()
	// Replacing the handler is safe: nothing can have connected before READY is printed.
	upstreamHandler = server.Config.Handler
	server.Config.Handler = &interceptor{upstream: server.Config.Handler, control: control}

	cl, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", controlPort))
	if err != nil {
		return fmt.Errorf("control listener: %w", err)
	}
	go func() { _ = http.Serve(cl, control) }()

	fmt.Printf("READY %s/sdk control=http://%s\n", serverBase, cl.Addr().String())
	os.Stdout.Sync()
	select {}
}

// adoptDatastore moves upstream's temporary datastore directory into --datastore-dir and
// points the datastore at it, leaving a symlink for any path upstream kept.
func adoptDatastore() error {
	for _, e := range simulator.Map.All("Datastore") {
		ds, ok := e.(*simulator.Datastore)
		if !ok {
			continue
		}
		info := ds.Info.GetDatastoreInfo()
		old := info.Url
		if old == datastoreDir {
			continue
		}
		entries, err := os.ReadDir(old)
		if err != nil {
			return fmt.Errorf("reading upstream datastore %s: %w", old, err)
		}
		for _, ent := range entries {
			if err := os.Rename(filepath.Join(old, ent.Name()), filepath.Join(datastoreDir, ent.Name())); err != nil {
				return fmt.Errorf("moving %s into %s: %w", ent.Name(), datastoreDir, err)
			}
		}
		if err := os.Remove(old); err != nil {
			return err
		}
		if err := os.Symlink(datastoreDir, old); err != nil {
			return err
		}
		info.Url = datastoreDir
		ds.Summary.Url = datastoreDir
	}
	return nil
}
