package main

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// interceptor sits in front of upstream's mux: it serves the control API, guards /folder
// and /nfc with the session cookie, implements the SOAP methods upstream lacks, and keeps
// the disk model in step with upstream's after every call it forwards.
type interceptor struct {
	upstream http.Handler
	control  http.Handler
}

func (h *interceptor) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case strings.HasPrefix(r.URL.Path, "/_rehost/"):
		h.control.ServeHTTP(w, r)
	case strings.HasPrefix(r.URL.Path, "/folder/"):
		h.serveFolder(w, r)
	case strings.HasPrefix(r.URL.Path, "/nfc/"):
		h.serveNFC(w, r)
	case (r.URL.Path == "/sdk" || r.URL.Path == "/sdk/vimService") && r.Method == http.MethodPost:
		h.serveSOAP(w, r)
	default:
		h.upstream.ServeHTTP(w, r)
	}
}

// validSession asks upstream whether the request's vmware_soap_session cookie names a live
// session, by replaying it on a call that needs one (so expiry and logout count too).
func (h *interceptor) validSession(r *http.Request) bool {
	c, err := r.Cookie(soap.SessionCookieName)
	if err != nil || c.Value == "" {
		return false
	}
	const body = `<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></CurrentTime></soapenv:Body></soapenv:Envelope>`
	req := httptest.NewRequest(http.MethodPost, "/sdk", strings.NewReader(body))
	req.AddCookie(&http.Cookie{Name: soap.SessionCookieName, Value: c.Value})
	rec := httptest.NewRecorder()
	h.upstream.ServeHTTP(rec, req)
	return rec.Code == http.StatusOK
}

// sessionRequired are the methods upstream answers without a session though vCenter
// answers NotAuthenticated (it lets only RetrieveServiceContent and the logins through).
var sessionRequired = map[string]bool{
	"RetrieveProperties": true, "RetrievePropertiesEx": true, "ContinueRetrievePropertiesEx": true,
	"Fetch": true, "List": true,
}

// unlockedMethods may block (long polls) and touch no disk, so they skip the store lock.
var unlockedMethods = map[string]bool{
	"WaitForUpdates": true, "WaitForUpdatesEx": true, "CheckForUpdates": true,
}

func (h *interceptor) serveSOAP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		http.Error(w, "reading body: "+err.Error(), http.StatusBadRequest)
		return
	}
	if name := soapMethodName(body); sessionRequired[name] && !h.validSession(r) {
		// Upstream lets these through without a session (answering empty objects);
		// vCenter refuses them.
		writeFault(w, "The session is not authenticated.", &types.NotAuthenticated{NoPermission: types.NoPermission{PrivilegeId: "System.View"}})
		return
	}
	method, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	if err != nil {
		// Upstream-internal methods (Fetch) and malformed requests: upstream answers.
		r.Body = io.NopCloser(bytes.NewReader(body))
		h.forward(w, r, soapMethodName(body))
		return
	}
	if f := faults.takeSOAP(method.Name); f != nil {
		logf("fault injection: %s answers %T", method.Name, f.fault)
		writeFault(w, f.msg, f.fault)
		return
	}
	if priv := privileges.deniedFor(method.Name); priv != "" && h.validSession(r) {
		writeFault(w, "Permission to perform this operation was denied.", &types.NoPermission{Object: method.This, PrivilegeId: priv})
		return
	}

	handler, own := ownMethods[method.Name]
	if own && privilegeQueries[method.Name] && !privileges.active() {
		own = false // upstream answers "all granted" itself
	}
	if own {
		if !h.validSession(r) {
			writeFault(w, "", &types.NotAuthenticated{NoPermission: types.NoPermission{Object: method.This, PrivilegeId: "System.View"}})
			return
		}
		store.mu.Lock()
		_ = store.reconcile()
		res, ferr := handler(r, method)
		store.mu.Unlock()
		if ferr != nil {
			writeFault(w, ferr.msg, ferr.fault)
			return
		}
		writeResult(w, res)
		return
	}

	r.Body = io.NopCloser(bytes.NewReader(body))
	if unlockedMethods[method.Name] {
		h.forward(w, r, method.Name)
		return
	}
	store.mu.Lock()
	defer store.mu.Unlock()
	if err := store.reconcile(); err != nil {
		logf("reconcile before %s: %v", method.Name, err)
	}
	switch method.Name {
	case "RemoveSnapshot_Task":
		h.forwardRemoveSnapshot(w, r, method)
	case "RetrievePropertiesEx":
		h.retrievePaged(w, r, method)
	case "CreateImportSpec":
		h.forwardCreateImportSpec(w, r, method)
	case "ImportVApp":
		h.forwardImportVApp(w, r, method)
	default:
		h.forward(w, r, method.Name)
	}
	if err := store.reconcile(); err != nil {
		logf("reconcile after %s: %v", method.Name, err)
	}
}

// forward hands a SOAP call to upstream. Upstream panics on some inputs (a Fetch of an unset
// property such as a VM's snapshot when it has none), which drops the connection; vCenter
// answers such a Fetch with an empty response, and anything else with a fault.
func (h *interceptor) forward(w http.ResponseWriter, r *http.Request, name string) {
	defer func() {
		p := recover()
		if p == nil {
			return
		}
		if p == http.ErrAbortHandler {
			panic(p)
		}
		logf("upstream panicked in %s: %v", name, p)
		if name == "Fetch" {
			writeRawBody(w, `<FetchResponse xmlns="urn:vim25"></FetchResponse>`)
			return
		}
		writeFault(w, fmt.Sprintf("A general system error occurred: %v", p), &types.SystemError{Reason: fmt.Sprint(p)})
	}()
	h.upstream.ServeHTTP(w, r)
}

// soapMethodName finds the name of the first element inside the SOAP Body.
func soapMethodName(body []byte) string {
	d := xml.NewDecoder(bytes.NewReader(body))
	inBody := false
	for {
		tok, err := d.Token()
		if err != nil {
			return ""
		}
		if se, ok := tok.(xml.StartElement); ok {
			if inBody {
				return se.Name.Local
			}
			inBody = se.Name.Local == "Body"
		}
	}
}

var taskRefPattern = regexp.MustCompile(`<returnval type="Task">([^<]+)</returnval>`)

// forwardRemoveSnapshot forwards RemoveSnapshot_Task and then names the VM as the task's
// entity, as vCenter does (upstream names the snapshot, which breaks clients that watch
// the VM's tasks). The task has finished when upstream answers, so the answer is held back
// until the entity is fixed.
func (h *interceptor) forwardRemoveSnapshot(w http.ResponseWriter, r *http.Request, m *simulator.Method) {
	var vmRef types.ManagedObjectReference
	if snap, ok := simulator.Map.Get(m.This).(*simulator.VirtualMachineSnapshot); ok {
		vmRef = snap.Vm
	}
	rec := httptest.NewRecorder()
	h.forward(rec, r, m.Name)
	if match := taskRefPattern.FindSubmatch(rec.Body.Bytes()); match != nil && vmRef.Value != "" {
		ref := types.ManagedObjectReference{Type: "Task", Value: string(match[1])}
		if task, ok := simulator.Map.Get(ref).(*simulator.Task); ok {
			name := ""
			if vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine); ok {
				name = vm.Name
			}
			simulator.Map.WithLock(task, func() {
				task.Info.Entity = &vmRef
				task.Info.EntityName = name
			})
		}
	}
	copyRecorded(w, rec)
}
