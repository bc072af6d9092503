package main

import (
	"net/http"
	"strings"
	"time"
)

// serveFolder guards upstream's datastore file access like vCenter: no valid session
// cookie, no access (401); a denied Datastore privilege answers 403; injected faults apply.
func (h *interceptor) serveFolder(w http.ResponseWriter, r *http.Request) {
	if !h.validSession(r) {
		w.Header().Set("WWW-Authenticate", `Basic realm="VMware HTTP server"`)
		http.Error(w, "401 Unauthorized: a valid vmware_soap_session cookie is required", http.StatusUnauthorized)
		return
	}
	if !privileges.granted(folderPrivilege(r.Method)) {
		http.Error(w, "403 Forbidden: missing privilege "+folderPrivilege(r.Method), http.StatusForbidden)
		return
	}
	rel := strings.TrimPrefix(r.URL.Path, "/folder/") // already percent-decoded by net/http
	if r.Method == http.MethodPut || r.Method == http.MethodPost {
		// A PUT can change a disk's size or content behind our back: re-read after it.
		store.mu.Lock()
		defer store.mu.Unlock()
		if d := store.diskWithSnapshotsOwning(rel); d != nil {
			// vCenter cannot write a disk file an ESXi host holds locked under a snapshot;
			// letting it through would also change a frozen base behind the snapshot.
			http.Error(w, "409 Conflict: "+rel+" belongs to disk "+d.vmName+" which has snapshots", http.StatusConflict)
			return
		}
		h.upstream.ServeHTTP(w, r)
		_ = store.reconcile()
		return
	}
	if r.Method == http.MethodGet {
		if f := faults.takeFolder(rel); f != nil {
			if f.status != 0 {
				logf("fault injection: /folder/%s answers %d", rel, f.status)
				http.Error(w, "injected failure", f.status)
				return
			}
			if f.delayMs > 0 {
				time.Sleep(time.Duration(f.delayMs) * time.Millisecond)
			}
			if f.afterBytes >= 0 {
				w = &abortingWriter{ResponseWriter: w, limit: f.afterBytes}
			}
		}
	}
	h.upstream.ServeHTTP(w, r)
}
