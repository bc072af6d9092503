package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// newControlMux serves the test control API (plain HTTP, no SOAP, no auth): see README.md.
func newControlMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/_rehost/vms", controlVMs)
	mux.HandleFunc("/_rehost/disk", controlDiskRead)
	mux.HandleFunc("/_rehost/disk/info", controlDiskInfo)
	mux.HandleFunc("/_rehost/disk/load", post(controlDiskLoad))
	mux.HandleFunc("/_rehost/disk/write", post(controlDiskWrite))
	mux.HandleFunc("/_rehost/power", post(controlPower))
	mux.HandleFunc("/_rehost/snapshots", controlSnapshots)
	mux.HandleFunc("/_rehost/cbt/window", post(controlCBTWindow))
	mux.HandleFunc("/_rehost/lease/timeout", post(controlLeaseTimeout))
	mux.HandleFunc("/_rehost/retrieve/page", post(controlRetrievePage))
	mux.HandleFunc("/_rehost/export/layout", post(controlExportLayout))
	mux.HandleFunc("/_rehost/export/star-host", post(controlStarHost))
	mux.HandleFunc("/_rehost/fault/folder", post(controlFaultFolder))
	mux.HandleFunc("/_rehost/fault/soap", post(controlFaultSOAP))
	mux.HandleFunc("/_rehost/fault/clear", post(func(w http.ResponseWriter, r *http.Request) {
		faults.clear()
		writeJSON(w, map[string]bool{"ok": true})
	}))
	mux.HandleFunc("/_rehost/privileges", controlPrivileges)
	return mux
}

func post(f http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			controlError(w, http.StatusMethodNotAllowed, "use POST")
			return
		}
		f(w, r)
	}
}

func writeJSON(w http.ResponseWriter, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func controlError(w http.ResponseWriter, status int, format string, args ...interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": fmt.Sprintf(format, args...)})
}

// withDisk resolves ?vm=NAME&key=N (key defaults to the VM's only disk) under store.mu.
func withDisk(w http.ResponseWriter, r *http.Request, f func(d *disk)) {
	q := r.URL.Query()
	name := q.Get("vm")
	store.mu.Lock()
	defer store.mu.Unlock()
	if err := store.reconcile(); err != nil {
		controlError(w, http.StatusInternalServerError, "reconcile: %v", err)
		return
	}
	var d *disk
	if ks := q.Get("key"); ks != "" {
		key, err := strconv.ParseInt(ks, 10, 32)
		if err != nil {
			controlError(w, http.StatusBadRequest, "bad key %q", ks)
			return
		}
		if d, err = store.findDisk(name, int32(key)); err != nil {
			controlError(w, http.StatusNotFound, "%v", err)
			return
		}
	} else {
		vm := findVM(name)
		if vm == nil {
			controlError(w, http.StatusNotFound, "no VM named %q", name)
			return
		}
		for _, x := range store.disks {
			if x.vmRef == vm.Self {
				if d != nil {
					controlError(w, http.StatusBadRequest, "VM %q has several disks: pass key", name)
					return
				}
				d = x
			}
		}
		if d == nil {
			controlError(w, http.StatusNotFound, "VM %q has no disk", name)
			return
		}
	}
	f(d)
}

type diskJSON struct {
	Key           int32    `json:"key"`
	CapacityBytes int64    `json:"capacity_bytes"`
	Backing       string   `json:"backing"`   // current backing fileName, e.g. [LocalDS_0] VM/disk1-000001.vmdk
	BaseFlat      string   `json:"base_flat"` // datastore-relative path of the base flat file
	CurrentFile   string   `json:"current_file"`
	ChangeID      string   `json:"change_id,omitempty"`
	Snapshots     []string `json:"snapshots"` // morefs of the chain, oldest first
}

func describeDisk(d *disk) diskJSON {
	size, _ := d.size()
	out := diskJSON{
		Key: d.key, CapacityBytes: size, Backing: d.layerDescriptor(len(d.layers) - 1),
		BaseFlat: d.dir + "/" + d.stem + "-flat.vmdk", CurrentFile: d.current(),
		ChangeID: d.cbt.changeID(), Snapshots: []string{},
	}
	for _, s := range d.chain {
		out.Snapshots = append(out.Snapshots, s.ref.Value)
	}
	return out
}

func controlVMs(w http.ResponseWriter, r *http.Request) {
	store.mu.Lock()
	defer store.mu.Unlock()
	_ = store.reconcile()
	type vmJSON struct {
		Name       string     `json:"name"`
		Moref      string     `json:"moref"`
		PowerState string     `json:"power_state"`
		Disks      []diskJSON `json:"disks"`
		// ExtraConfig is the VM's config.extraConfig; upstream's CreateImportSpec puts
		// the OVF properties of propertyMapping there (vCenter: vAppConfig.property).
		ExtraConfig map[string]string `json:"extra_config"`
	}
	out := []vmJSON{}
	for _, vm := range allVMs() {
		v := vmJSON{Name: vm.Name, Moref: vm.Self.Value, Disks: []diskJSON{}}
		v.ExtraConfig = map[string]string{}
		simulator.Map.WithLock(vm, func() {
			v.PowerState = string(vm.Runtime.PowerState)
			if vm.Config != nil {
				for _, o := range vm.Config.ExtraConfig {
					ov := o.GetOptionValue()
					v.ExtraConfig[ov.Key] = fmt.Sprint(ov.Value)
				}
			}
		})
		for _, d := range store.disks {
			if d.vmRef == vm.Self {
				v.Disks = append(v.Disks, describeDisk(d))
			}
		}
		sort.Slice(v.Disks, func(i, j int) bool { return v.Disks[i].Key < v.Disks[j].Key })
		out = append(out, v)
	}
	writeJSON(w, out)
}

func controlDiskInfo(w http.ResponseWriter, r *http.Request) {
	withDisk(w, r, func(d *disk) { writeJSON(w, describeDisk(d)) })
}

// controlDiskRead serves the disk as the guest sees it now (ranged GET supported).
func controlDiskRead(w http.ResponseWriter, r *http.Request) {
	withDisk(w, r, func(d *disk) {
		f, err := os.Open(d.current())
		if err != nil {
			controlError(w, http.StatusInternalServerError, "%v", err)
			return
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			controlError(w, http.StatusInternalServerError, "%v", err)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		http.ServeContent(w, r, "disk", fi.ModTime(), f)
	})
}

// controlDiskLoad replaces a disk's size and content with a local file's; refused while a
// snapshot exists (vSphere cannot resize a disk with snapshots either).
func controlDiskLoad(w http.ResponseWriter, r *http.Request) {
	src := r.URL.Query().Get("path")
	if src == "" {
		controlError(w, http.StatusBadRequest, "path is required")
		return
	}
	withDisk(w, r, func(d *disk) {
		if len(d.chain) > 0 {
			controlError(w, http.StatusConflict, "disk %s/%d has snapshots: remove them before loading", d.vmName, d.key)
			return
		}
		fi, err := os.Stat(src)
		if err != nil {
			controlError(w, http.StatusBadRequest, "%v", err)
			return
		}
		if fi.Size() == 0 || fi.Size()%1024 != 0 {
			// vSphere sizes disks in whole KB (capacityInKB); so does the emulator.
			controlError(w, http.StatusBadRequest, "%s: size %d is not a positive multiple of 1024", src, fi.Size())
			return
		}
		if err := d.unshare(); err != nil {
			controlError(w, http.StatusInternalServerError, "%v", err)
			return
		}
		if err := copySparse(src, d.current()); err != nil {
			controlError(w, http.StatusInternalServerError, "loading %s: %v", src, err)
			return
		}
		d.cbt.record(0, fi.Size())
		if err := d.writeDescriptor(fi.Size()); err != nil {
			controlError(w, http.StatusInternalServerError, "%v", err)
			return
		}
		if err := store.reconcile(); err != nil {
			controlError(w, http.StatusInternalServerError, "%v", err)
			return
		}
		writeJSON(w, describeDisk(d))
	})
}

// controlDiskWrite writes the body at ?offset= as the running guest would: into the current
// layer (the delta while a snapshot exists), recorded by CBT.
func controlDiskWrite(w http.ResponseWriter, r *http.Request) {
	offset, err := strconv.ParseInt(r.URL.Query().Get("offset"), 10, 64)
	if err != nil || offset < 0 {
		controlError(w, http.StatusBadRequest, "bad offset %q", r.URL.Query().Get("offset"))
		return
	}
	data, err := io.ReadAll(r.Body)
	if err != nil {
		controlError(w, http.StatusBadRequest, "reading body: %v", err)
		return
	}
	withDisk(w, r, func(d *disk) {
		size, err := d.size()
		if err != nil {
			controlError(w, http.StatusInternalServerError, "%v", err)
			return
		}
		if offset+int64(len(data)) > size {
			controlError(w, http.StatusRequestedRangeNotSatisfiable, "write of %d bytes at %d is past the disk's end (%d)", len(data), offset, size)
			return
		}
		if err := d.unshare(); err != nil {
			controlError(w, http.StatusInternalServerError, "%v", err)
			return
		}
		f, err := os.OpenFile(d.current(), os.O_WRONLY, 0)
		if err != nil {
			controlError(w, http.StatusInternalServerError, "%v", err)
			return
		}
		_, werr := f.WriteAt(data, offset)
		cerr := f.Close()
		if werr == nil {
			werr = cerr
		}
		if werr != nil {
			controlError(w, http.StatusInternalServerError, "%v", werr)
			return
		}
		d.cbt.record(offset, int64(len(data)))
		if err := store.reconcile(); err != nil {
			controlError(w, http.StatusInternalServerError, "%v", err)
			return
		}
		writeJSON(w, describeDisk(d))
	})
}

// controlPower sets a VM's power state directly (no task), ?vm=NAME&state=on|off|suspended.
func controlPower(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	states := map[string]types.VirtualMachinePowerState{
		"on": types.VirtualMachinePowerStatePoweredOn, "poweredOn": types.VirtualMachinePowerStatePoweredOn,
		"off": types.VirtualMachinePowerStatePoweredOff, "poweredOff": types.VirtualMachinePowerStatePoweredOff,
		"suspended": types.VirtualMachinePowerStateSuspended,
	}
	state, ok := states[q.Get("state")]
	if !ok {
		controlError(w, http.StatusBadRequest, "state must be on, off or suspended")
		return
	}
	vm := findVM(q.Get("vm"))
	if vm == nil {
		controlError(w, http.StatusNotFound, "no VM named %q", q.Get("vm"))
		return
	}
	simulator.Map.WithLock(vm, func() {
		simulator.Map.Update(vm, []types.PropertyChange{
			{Name: "runtime.powerState", Val: state},
			{Name: "summary.runtime.powerState", Val: state},
		})
	})
	writeJSON(w, map[string]string{"vm": vm.Name, "power_state": string(state)})
}

func controlSnapshots(w http.ResponseWriter, r *http.Request) {
	vm := findVM(r.URL.Query().Get("vm"))
	if vm == nil {
		controlError(w, http.StatusNotFound, "no VM named %q", r.URL.Query().Get("vm"))
		return
	}
	names := []string{}
	simulator.Map.WithLock(vm, func() {
		if vm.Snapshot == nil {
			return
		}
		var walk func([]types.VirtualMachineSnapshotTree)
		walk = func(list []types.VirtualMachineSnapshotTree) {
			for _, s := range list {
				names = append(names, s.Name)
				walk(s.ChildSnapshotList)
			}
		}
		walk(vm.Snapshot.RootSnapshotList)
	})
	writeJSON(w, names)
}

func controlCBTWindow(w http.ResponseWriter, r *http.Request) {
	n, err := strconv.ParseInt(r.URL.Query().Get("bytes"), 10, 64)
	if err != nil || n <= 0 || n%512 != 0 {
		controlError(w, http.StatusBadRequest, "bytes must be a positive multiple of 512")
		return
	}
	setCBTWindow(n)
	writeJSON(w, map[string]int64{"window_bytes": n})
}

func controlLeaseTimeout(w http.ResponseWriter, r *http.Request) {
	s, err := strconv.ParseFloat(r.URL.Query().Get("seconds"), 64)
	if err != nil || s <= 0 {
		controlError(w, http.StatusBadRequest, "seconds must be a positive number")
		return
	}
	setLeaseTimeout(time.Duration(s * float64(time.Second)))
	writeJSON(w, map[string]float64{"lease_timeout_seconds": s})
}

// controlFaultFolder: ?path=VM/disk1-flat.vmdk&after=N (abort after N bytes) or &status=500;
// &count=K failures (default 1, -1 = always).
func controlFaultFolder(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := &folderFault{path: strings.TrimPrefix(q.Get("path"), "/"), remaining: 1, afterBytes: -1}
	if f.path == "" {
		controlError(w, http.StatusBadRequest, "path is required")
		return
	}
	var err error
	if s := q.Get("after"); s != "" {
		if f.afterBytes, err = strconv.ParseInt(s, 10, 64); err != nil || f.afterBytes < 0 {
			controlError(w, http.StatusBadRequest, "bad after %q", s)
			return
		}
	}
	if s := q.Get("delay_ms"); s != "" {
		if f.delayMs, err = strconv.Atoi(s); err != nil || f.delayMs < 0 {
			controlError(w, http.StatusBadRequest, "bad delay_ms %q", s)
			return
		}
	}
	if f.afterBytes < 0 && f.delayMs == 0 && q.Get("status") == "" {
		f.afterBytes = 0 // a bare fault aborts at once, as before
	}
	if s := q.Get("status"); s != "" {
		if f.status, err = strconv.Atoi(s); err != nil || f.status < 400 || f.status > 599 {
			controlError(w, http.StatusBadRequest, "status must be 400..599")
			return
		}
	}
	if s := q.Get("count"); s != "" {
		if f.remaining, err = strconv.Atoi(s); err != nil || f.remaining == 0 {
			controlError(w, http.StatusBadRequest, "count must be positive or -1")
			return
		}
	}
	faults.addFolder(f)
	writeJSON(w, map[string]interface{}{"path": f.path, "after": f.afterBytes, "delay_ms": f.delayMs, "status": f.status, "count": f.remaining})
}

// controlFaultSOAP: ?method=RemoveSnapshot_Task&fault=SystemError&count=1.
func controlFaultSOAP(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	method := q.Get("method")
	if method == "" {
		controlError(w, http.StatusBadRequest, "method is required")
		return
	}
	count := 1
	if s := q.Get("count"); s != "" {
		var err error
		if count, err = strconv.Atoi(s); err != nil || count == 0 {
			controlError(w, http.StatusBadRequest, "count must be positive or -1")
			return
		}
	}
	fault := q.Get("fault")
	if fault == "" {
		fault = "SystemError"
	}
	faults.addSOAP(method, fault, count)
	writeJSON(w, map[string]interface{}{"method": method, "fault": fault, "count": count})
}

// controlPrivileges: GET lists the denied privileges; POST ?deny=a,b replaces the list
// (empty: everything granted again).
func controlPrivileges(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost {
		var ids []string
		if s := r.URL.Query().Get("deny"); s != "" {
			ids = strings.Split(s, ",")
		}
		privileges.set(ids)
	}
	writeJSON(w, map[string][]string{"denied": privileges.list()})
}

// controlRetrievePage: ?objects=N pages RetrievePropertiesEx answers at N objects even
// without maxObjects (0: only when the client asks).
func controlRetrievePage(w http.ResponseWriter, r *http.Request) {
	n, err := strconv.ParseInt(r.URL.Query().Get("objects"), 10, 64)
	if err != nil || n < 0 {
		controlError(w, http.StatusBadRequest, "objects must be a non-negative integer")
		return
	}
	atomic.StoreInt64(&serverPageObjects, n)
	writeJSON(w, map[string]int64{"page_objects": n})
}

// controlExportLayout: ?layout=esxi|qemu for the streamOptimized VMDKs of later exports.
func controlExportLayout(w http.ResponseWriter, r *http.Request) {
	l := r.URL.Query().Get("layout")
	if l != exportLayoutESXi && l != exportLayoutQemu {
		controlError(w, http.StatusBadRequest, "layout must be esxi or qemu")
		return
	}
	exportLayout.Store(l)
	writeJSON(w, map[string]string{"layout": l})
}

// controlStarHost: ?enabled=1 makes later leases' deviceUrl hosts "*" (0: the real host).
func controlStarHost(w http.ResponseWriter, r *http.Request) {
	on := r.URL.Query().Get("enabled") == "1"
	starHost.Store(on)
	writeJSON(w, map[string]bool{"star_host": on})
}
