package main

import (
	"bytes"
	stdxml "encoding/xml"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// Import (OvfManager.CreateImportSpec, ResourcePool.ImportVApp and the NFC upload), made
// as strict as vCenter where upstream is lax:
//   - upstream creates a second VM of a name already in the folder; vCenter answers
//     DuplicateName, and so does the emulator;
//   - upstream's import lease never expires, takes uploads of any length (even after it is
//     completed, as the lease stays registered) and keeps the half-imported VM on abort;
//     here the lease is an exportLease with upload targets: it expires without progress,
//     an upload must be exactly the fileItem's size (a streamOptimized disk POSTed with
//     Content-Type application/x-vnd.vmware-streamVmdk and starting with "KDMV"), uploads
//     to a lease that is done or in error answer 404, and an abort or expiry destroys the
//     VM, as vCenter does.
// The bytes are still discarded: the imported VM's disks are empty.

// importSizes remembers the size of each fileItem of CreateImportSpec answers, by deviceId
// (/NAME/disk:0, which ImportVApp's deviceUrl importKey repeats).
var importSizes sync.Map

// upstreamHandler is upstream's mux, for the calls the emulator makes on its own behalf.
var upstreamHandler http.Handler

// importUpload is one file an import lease takes.
type importUpload struct {
	size     int64 // from CreateImportSpec; -1 if unknown
	disk     bool
	received bool
}

const streamVmdkType = "application/x-vnd.vmware-streamVmdk"

func (h *interceptor) forwardCreateImportSpec(w http.ResponseWriter, r *http.Request, m *simulator.Method) {
	rec := httptest.NewRecorder()
	h.forward(rec, r, m.Name)
	if rec.Code == http.StatusOK {
		var env struct {
			Body struct {
				Res struct {
					Returnval struct {
						FileItem []struct {
							DeviceID string `xml:"deviceId"`
							Size     int64  `xml:"size"`
						} `xml:"fileItem"`
					} `xml:"returnval"`
				} `xml:"CreateImportSpecResponse"`
			} `xml:"Body"`
		}
		if err := stdxml.Unmarshal(rec.Body.Bytes(), &env); err != nil {
			logf("reading the CreateImportSpec answer: %v", err)
		}
		for _, item := range env.Body.Res.Returnval.FileItem {
			importSizes.Store(item.DeviceID, item.Size)
		}
	}
	copyRecorded(w, rec)
}

var leaseRefPattern = regexp.MustCompile(`<returnval type="HttpNfcLease">([^<]+)</returnval>`)

// datacenterOf walks an entity's parents up to its datacenter.
func datacenterOf(ref types.ManagedObjectReference) *simulator.Datacenter {
	for i := 0; i < 64; i++ {
		obj := simulator.Map.Get(ref)
		if obj == nil {
			return nil
		}
		if dc, ok := obj.(*simulator.Datacenter); ok {
			return dc
		}
		e, ok := obj.(mo.Entity)
		if !ok || e.Entity().Parent == nil {
			return nil
		}
		ref = *e.Entity().Parent
	}
	return nil
}

func (h *interceptor) forwardImportVApp(w http.ResponseWriter, r *http.Request, m *simulator.Method) {
	req := m.Body.(*types.ImportVApp)
	spec, ok := req.Spec.(*types.VirtualMachineImportSpec)
	if !ok {
		h.forward(w, r, m.Name) // upstream answers InvalidArgument
		return
	}
	var folderRef types.ManagedObjectReference
	if req.Folder != nil {
		folderRef = *req.Folder
	} else if dc := datacenterOf(req.This); dc != nil {
		folderRef = dc.VmFolder
	}
	folder, ok := simulator.Map.Get(folderRef).(*simulator.Folder)
	if !ok {
		writeFault(w, "", &types.ManagedObjectNotFound{Obj: folderRef})
		return
	}
	name := spec.ConfigSpec.Name
	var children []types.ManagedObjectReference
	simulator.Map.WithLock(folder, func() { children = append(children, folder.ChildEntity...) })
	if simulator.Map.FindByName(name, children) != nil {
		writeFault(w, fmt.Sprintf("The name '%s' already exists.", name), &types.DuplicateName{Name: name, Object: folder.Self})
		return
	}

	rec := httptest.NewRecorder()
	h.forward(rec, r, m.Name)
	match := leaseRefPattern.FindSubmatch(rec.Body.Bytes())
	if rec.Code != http.StatusOK || match == nil {
		copyRecorded(w, rec)
		return
	}
	cookie := ""
	if c, err := r.Cookie(soap.SessionCookieName); err == nil {
		cookie = c.Value
	}
	// Upstream's own lease would take uploads forever; it is completed at once and ours
	// takes its place.
	_, _ = upstreamCall(cookie, fmt.Sprintf(`<HttpNfcLeaseComplete xmlns="urn:vim25"><_this type="HttpNfcLease">%s</_this></HttpNfcLeaseComplete>`, match[1]))

	simulator.Map.WithLock(folder, func() { children = append(children[:0], folder.ChildEntity...) })
	vm, ok := simulator.Map.FindByName(name, children).(*simulator.VirtualMachine)
	if !ok {
		writeFault(w, "the imported VM is not in its folder", &types.SystemError{Reason: "import"})
		return
	}

	n := atomic.AddInt64(&leaseCounter, 1)
	ref := types.ManagedObjectReference{Type: "HttpNfcLease", Value: fmt.Sprintf("52-lease-%d", n)}
	lease := &exportLease{
		HttpNfcLease: mo.HttpNfcLease{Self: ref, State: types.HttpNfcLeaseStateReady},
		files:        map[string]string{},
		uploads:      map[string]*importUpload{},
		importVM:     &vm.Self,
		cookie:       cookie,
	}
	info := &types.HttpNfcLeaseInfo{Lease: ref, Entity: vm.Self, LeaseTimeout: int32(getLeaseTimeout() / time.Second)}
	var devices object.VirtualDeviceList
	simulator.Map.WithLock(vm, func() { devices = append(devices, vm.Config.Hardware.Device...) })
	counts := map[string]int{}
	for _, d := range devices {
		backing, ok := d.GetVirtualDevice().Backing.(types.BaseVirtualDeviceFileBackingInfo)
		if !ok {
			continue
		}
		var file object.DatastorePath
		file.FromString(backing.GetVirtualDeviceFileBackingInfo().FileName)
		base := path.Base(file.Path)
		_, disk := d.(*types.VirtualDisk)
		kind := devices.Type(d)
		i := counts[kind]
		counts[kind]++
		importKey := fmt.Sprintf("/%s/%s:%d", name, kind, i)
		size := int64(-1)
		if v, ok := importSizes.Load(importKey); ok {
			size = v.(int64)
		}
		lease.uploads[base] = &importUpload{size: size, disk: disk}
		info.DeviceUrl = append(info.DeviceUrl, types.HttpNfcLeaseDeviceUrl{
			Key:           fmt.Sprintf("/%s/%s:%d", vm.Self.Value, kind, i),
			ImportKey:     importKey,
			Url:           fmt.Sprintf("%s/nfc/%s/%s", nfcBase(), ref.Value, base),
			SslThumbprint: serverThumbprint,
			Disk:          types.NewBool(disk),
			TargetId:      base,
		})
	}
	lease.Info = info
	simulator.Map.Put(lease)
	leases.Store(ref.Value, lease)
	simulator.Map.WithLock(lease, func() { lease.armTimer() })
	writeResult(w, &methods.ImportVAppBody{Res: &types.ImportVAppResponse{Returnval: ref}})
}

// upstreamCall makes a SOAP call to upstream in the given session; answers the HTTP status
// and body.
func upstreamCall(cookie, inner string) (int, []byte) {
	body := `<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>` + inner + `</soapenv:Body></soapenv:Envelope>`
	req := httptest.NewRequest(http.MethodPost, "/sdk", strings.NewReader(body))
	req.AddCookie(&http.Cookie{Name: soap.SessionCookieName, Value: cookie})
	rec := httptest.NewRecorder()
	upstreamHandler.ServeHTTP(rec, req)
	return rec.Code, rec.Body.Bytes()
}

// destroyImported removes the VM of an import lease that ended in error, as vCenter does.
func (l *exportLease) destroyImported() {
	if l.importVM == nil {
		return
	}
	vm := *l.importVM
	l.importVM = nil
	code, body := upstreamCall(l.cookie, fmt.Sprintf(`<Destroy_Task xmlns="urn:vim25"><_this type="VirtualMachine">%s</_this></Destroy_Task>`, vm.Value))
	logf("import lease %s ended in error: Destroy_Task %s answered %d %s", l.Self.Value, vm.Value, code, snippetOf(body))
}

func snippetOf(b []byte) string {
	if len(b) > 200 {
		b = b[:200]
	}
	return string(b)
}

// serveUpload takes one file of an import lease (the caller checked the session).
func serveUpload(w http.ResponseWriter, r *http.Request, lease *exportLease, name string) {
	var target *importUpload
	var state types.HttpNfcLeaseState
	simulator.Map.WithLock(lease, func() { target, state = lease.uploads[name], lease.State })
	if state != types.HttpNfcLeaseStateReady || target == nil {
		http.Error(w, "404 Not Found: lease "+lease.Self.Value+" is "+string(state), http.StatusNotFound)
		return
	}
	switch r.Method {
	case http.MethodPost:
		if ct := r.Header.Get("Content-Type"); target.disk && ct != streamVmdkType {
			http.Error(w, fmt.Sprintf("415 Unsupported Media Type: a disk is POSTed as %s, not %q", streamVmdkType, ct), http.StatusUnsupportedMediaType)
			return
		}
	case http.MethodPut:
	default:
		http.Error(w, "405 Method Not Allowed: an import lease takes PUT or POST", http.StatusMethodNotAllowed)
		return
	}
	head := make([]byte, 4)
	n0, _ := io.ReadFull(r.Body, head)
	head = head[:n0]
	n, err := io.Copy(io.Discard, r.Body)
	n += int64(n0)
	if err != nil {
		logf("upload %s/%s broke after %d bytes: %v", lease.Self.Value, name, n, err)
		http.Error(w, "upload interrupted: "+err.Error(), http.StatusBadRequest)
		return
	}
	if r.Method == http.MethodPost && target.disk && !bytes.Equal(head, []byte("KDMV")) {
		http.Error(w, fmt.Sprintf("400 Bad Request: %s is not a streamOptimized VMDK (starts with %q)", name, head), http.StatusBadRequest)
		return
	}
	if target.size >= 0 && n != target.size {
		http.Error(w, fmt.Sprintf("400 Bad Request: received %d bytes of %s, the import spec's fileItem has %d", n, name, target.size), http.StatusBadRequest)
		return
	}
	simulator.Map.WithLock(lease, func() {
		if lease.State == types.HttpNfcLeaseStateReady {
			target.received = true
		}
	})
	logf("upload %s/%s: %d bytes", lease.Self.Value, name, n)
	w.WriteHeader(http.StatusOK)
}
