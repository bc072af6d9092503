package main

import (
	"net/http"
	"strings"
	"sync"

	"github.com/vmware/govmomi/vim25/types"
)

// faultTable holds the failures a test asked for through the control API.
type faultTable struct {
	mu     sync.Mutex
	folder []*folderFault
	soap   map[string]*soapFaultRule
}

// folderFault makes GETs of one datastore file fail: either abort the connection after
// afterBytes body bytes (a reset mid-download), or answer status straight away; or just
// slows them down by delayMs (a slow datastore, so a test can interrupt an export).
type folderFault struct {
	path       string // datastore-relative, e.g. DC0_H0_VM0/disk1-flat.vmdk
	afterBytes int64  // <0: do not abort
	delayMs    int
	status     int // 0: abort the connection; otherwise the HTTP status to answer
	remaining  int // how many more requests fail; <0 means all
}

type soapFaultRule struct {
	fault     string
	remaining int
}

var faults = &faultTable{soap: map[string]*soapFaultRule{}}

func (t *faultTable) clear() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.folder = nil
	t.soap = map[string]*soapFaultRule{}
}

func (t *faultTable) addFolder(f *folderFault) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.folder = append(t.folder, f)
}

func (t *faultTable) takeFolder(path string) *folderFault {
	t.mu.Lock()
	defer t.mu.Unlock()
	path = strings.TrimPrefix(path, "/")
	for i, f := range t.folder {
		if f.path != path || f.remaining == 0 {
			continue
		}
		if f.remaining > 0 {
			f.remaining--
		}
		if f.remaining == 0 {
			t.folder = append(t.folder[:i], t.folder[i+1:]...)
		}
		c := *f
		return &c
	}
	return nil
}

func (t *faultTable) addSOAP(method, fault string, count int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.soap[method] = &soapFaultRule{fault: fault, remaining: count}
}

func (t *faultTable) takeSOAP(method string) *methodFault {
	t.mu.Lock()
	defer t.mu.Unlock()
	r := t.soap[method]
	if r == nil || r.remaining == 0 {
		return nil
	}
	if r.remaining > 0 {
		r.remaining--
	}
	if r.remaining == 0 {
		delete(t.soap, method)
	}
	return soapFaultByName(r.fault, method)
}

// soapFaultByName builds the injectable faults; unknown names give SystemError.
func soapFaultByName(name, method string) *methodFault {
	switch name {
	case "NotAuthenticated":
		return newFault(&types.NotAuthenticated{}, "The session is not authenticated.")
	case "InvalidState":
		return newFault(&types.InvalidState{}, "The operation is not allowed in the current state.")
	case "TaskInProgress":
		return newFault(&types.TaskInProgress{}, "The operation is not allowed in the current state.")
	case "FileFault":
		return newFault(&types.FileFault{File: "injected"}, "Error caused by file injected")
	default:
		return newFault(&types.SystemError{Reason: "injected fault for " + method}, "A general system error occurred: injected fault for %s", method)
	}
}

// abortingWriter serves up to limit body bytes, then aborts the connection the way a
// network failure would (the client sees a truncated body / reset).
type abortingWriter struct {
	http.ResponseWriter
	limit   int64
	written int64
}

func (a *abortingWriter) Write(p []byte) (int, error) {
	if a.written+int64(len(p)) > a.limit {
		n := a.limit - a.written
		if n > 0 {
			_, _ = a.ResponseWriter.Write(p[:n])
			a.written += n
		}
		if f, ok := a.ResponseWriter.(http.Flusher); ok {
			f.Flush()
		}
		logf("fault injection: aborting the connection after %d bytes", a.written)
		panic(http.ErrAbortHandler)
	}
	n, err := a.ResponseWriter.Write(p)
	a.written += int64(n)
	return n, err
}
