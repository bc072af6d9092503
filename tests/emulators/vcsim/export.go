package main

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// leaseTimeout is how long a ready lease lives without an HttpNfcLeaseProgress call
// (vCenter: 300 s); settable through the control API so a test can check keep-alive.
var leaseTimeoutNanos = int64(300 * time.Second)

func getLeaseTimeout() time.Duration  { return time.Duration(atomic.LoadInt64(&leaseTimeoutNanos)) }
func setLeaseTimeout(d time.Duration) { atomic.StoreInt64(&leaseTimeoutNanos, int64(d)) }

var leaseCounter int64

// The streamOptimized layout ExportVm serves: ESXi's (GD at the end, footer, EOS marker),
// as a real vCenter streams, or qemu-img's (GD offset in the header, no footer).
const (
	exportLayoutESXi = "esxi"
	exportLayoutQemu = "qemu"
)

var exportLayout atomic.Value

func getExportLayout() string {
	if v, ok := exportLayout.Load().(string); ok {
		return v
	}
	return exportLayoutESXi
}

// exportLease is an HttpNfcLease for ExportVm; upstream's dispatcher calls its methods by
// reflection and its property collector reads the embedded mo.HttpNfcLease.
type exportLease struct {
	mo.HttpNfcLease
	files map[string]string // URL name -> streamOptimized VMDK produced for it
	timer *time.Timer
	dir   string

	// An import lease (ImportVApp) has upload targets instead of files, the VM it is
	// importing (destroyed if the lease ends in error) and the session that asked for it.
	uploads  map[string]*importUpload
	importVM *types.ManagedObjectReference
	cookie   string
}

var leases sync.Map // lease moref value -> *exportLease

// serverBase is https://127.0.0.1:PORT, set once the listener is up; serverThumbprint the
// SHA-256 thumbprint of its certificate (deviceUrl.sslThumbprint).
var serverBase, serverThumbprint string

// starHost: deviceUrl URLs name the host "*", as vCenter does when the client is to use
// the host it connected to (https://*/nfc/...). Off by default.
var starHost atomic.Value

func nfcBase() string {
	if on, _ := starHost.Load().(bool); on {
		return "https://*"
	}
	return serverBase
}

func exportVM(_ *http.Request, m *simulator.Method) (soap.HasFault, *methodFault) {
	req := m.Body.(*types.ExportVm)
	vm, f := vmByRef(req.This)
	if f != nil {
		return nil, f
	}
	if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		return nil, newFault(&types.InvalidPowerState{RequestedState: types.VirtualMachinePowerStatePoweredOff, ExistingState: vm.Runtime.PowerState},
			"The attempted operation cannot be performed in the current state (%s).", vm.Runtime.PowerState)
	}
	n := atomic.AddInt64(&leaseCounter, 1)
	ref := types.ManagedObjectReference{Type: "HttpNfcLease", Value: fmt.Sprintf("52-lease-%d", n)}
	dir := filepath.Join(workDir, "exports", ref.Value)
	lease := &exportLease{
		HttpNfcLease: mo.HttpNfcLease{Self: ref, State: types.HttpNfcLeaseStateInitializing},
		files:        map[string]string{},
		dir:          dir,
	}
	simulator.Map.Put(lease)
	leases.Store(ref.Value, lease)

	// Collect what to convert now, under store.mu (held by our caller).
	type job struct {
		name, src string
		url       types.HttpNfcLeaseDeviceUrl
		sizeKB    int64
	}
	var jobs []job
	var devices []types.BaseVirtualDevice
	simulator.Map.WithLock(vm, func() { devices = append(devices, vm.Config.Hardware.Device...) })
	i := 0
	for _, dev := range devices {
		vd, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		d := store.disks[diskID(vm.Self, vd.Key)]
		if d == nil {
			continue
		}
		name := fmt.Sprintf("disk-%d.vmdk", i)
		i++
		src := filepath.Join(dir, name+".raw")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, newFault(&types.SystemError{Reason: err.Error()}, "creating %s: %v", dir, err)
		}
		// Copy now so the export is the disk as of this call, whatever is written later.
		if err := copySparse(d.current(), src); err != nil {
			return nil, newFault(&types.SystemError{Reason: err.Error()}, "copying %s: %v", d.current(), err)
		}
		size, _ := d.size()
		jobs = append(jobs, job{name: name, src: src, sizeKB: size / 1024, url: types.HttpNfcLeaseDeviceUrl{
			Key:           deviceURLKey(vm, devices, vd),
			ImportKey:     deviceURLKey(vm, devices, vd),
			Url:           fmt.Sprintf("%s/nfc/%s/%s", nfcBase(), ref.Value, name),
			SslThumbprint: serverThumbprint,
			Disk:          types.NewBool(true),
			TargetId:      name,
		}})
	}

	layout := getExportLayout()
	go func() {
		info := &types.HttpNfcLeaseInfo{Lease: ref, Entity: vm.Self, LeaseTimeout: int32(getLeaseTimeout() / time.Second)}
		for _, j := range jobs {
			out := filepath.Join(dir, j.name)
			if layout == exportLayoutESXi {
				if err := writeESXiStream(j.src, out); err != nil {
					lease.fail(&types.SystemError{Reason: fmt.Sprintf("writing the stream: %v", err)})
					return
				}
			} else {
				cmd := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", j.src, out)
				if msg, err := cmd.CombinedOutput(); err != nil {
					lease.fail(&types.SystemError{Reason: fmt.Sprintf("qemu-img convert: %v: %s", err, strings.TrimSpace(string(msg)))})
					return
				}
			}
			_ = os.Remove(j.src)
			fi, err := os.Stat(out)
			if err != nil {
				lease.fail(&types.SystemError{Reason: err.Error()})
				return
			}
			j.url.FileSize = fi.Size()
			info.DeviceUrl = append(info.DeviceUrl, j.url)
			info.TotalDiskCapacityInKB += j.sizeKB
			simulator.Map.WithLock(lease, func() { lease.files[j.name] = out })
		}
		simulator.Map.WithLock(lease, func() {
			if lease.State != types.HttpNfcLeaseStateInitializing {
				return // aborted meanwhile
			}
			simulator.Map.Update(lease, []types.PropertyChange{
				{Name: "info", Val: info},
				{Name: "state", Val: types.HttpNfcLeaseStateReady},
			})
			lease.armTimer()
		})
	}()
	return &methods.ExportVmBody{Res: &types.ExportVmResponse{Returnval: ref}}, nil
}

// deviceURLKey names a disk as vCenter does in deviceUrl.key: /vm-42/VirtualLsiLogicController0:0.
func deviceURLKey(vm *simulator.VirtualMachine, devices []types.BaseVirtualDevice, vd *types.VirtualDisk) string {
	ctrlName, bus := "VirtualController", int32(0)
	for _, dev := range devices {
		if dev.GetVirtualDevice().Key != vd.ControllerKey {
			continue
		}
		ctrlName = reflect.TypeOf(dev).Elem().Name()
		if c, ok := dev.(types.BaseVirtualController); ok {
			bus = c.GetVirtualController().BusNumber
		}
	}
	unit := int32(0)
	if vd.UnitNumber != nil {
		unit = *vd.UnitNumber
	}
	return fmt.Sprintf("/%s/%s%d:%d", vm.Self.Value, ctrlName, bus, unit)
}

// armTimer (re)starts the expiry clock; the caller holds the lease's lock.
func (l *exportLease) armTimer() {
	if l.timer != nil {
		l.timer.Stop()
	}
	l.timer = time.AfterFunc(getLeaseTimeout(), func() {
		simulator.Map.WithLock(l, func() {
			if l.State == types.HttpNfcLeaseStateReady {
				logf("lease %s expired: no progress call within %s", l.Self.Value, getLeaseTimeout())
				l.setError(&types.Timedout{})
			}
		})
	})
}

func (l *exportLease) fail(fault types.BaseMethodFault) {
	simulator.Map.WithLock(l, func() { l.setError(fault) })
}

// setError ends the lease in state error; the caller holds the lease's lock.
func (l *exportLease) setError(fault types.BaseMethodFault) {
	simulator.Map.Update(l, []types.PropertyChange{
		{Name: "state", Val: types.HttpNfcLeaseStateError},
		{Name: "error", Val: &types.LocalizedMethodFault{Fault: fault, LocalizedMessage: fmt.Sprintf("%T", fault)}},
	})
	l.cleanup()
	l.destroyImported()
}

func (l *exportLease) cleanup() {
	if l.timer != nil {
		l.timer.Stop()
	}
	_ = os.RemoveAll(l.dir)
	l.files = map[string]string{}
}

func leaseStateFault(l *exportLease) *soap.Fault {
	return simulator.Fault(fmt.Sprintf("The lease is in state %s.", l.State), &types.InvalidState{})
}

// The three lease methods run with the lease's lock held by upstream's dispatcher.

func (l *exportLease) HttpNfcLeaseProgress(req *types.HttpNfcLeaseProgress) soap.HasFault {
	if l.State != types.HttpNfcLeaseStateReady {
		return &methods.HttpNfcLeaseProgressBody{Fault_: leaseStateFault(l)}
	}
	if req.Percent < 0 || req.Percent > 100 {
		return &methods.HttpNfcLeaseProgressBody{Fault_: simulator.Fault("percent must be 0..100", &types.InvalidArgument{InvalidProperty: "percent"})}
	}
	l.TransferProgress = req.Percent
	l.armTimer()
	return &methods.HttpNfcLeaseProgressBody{Res: new(types.HttpNfcLeaseProgressResponse)}
}

func (l *exportLease) HttpNfcLeaseComplete(req *types.HttpNfcLeaseComplete) soap.HasFault {
	if l.State != types.HttpNfcLeaseStateReady {
		return &methods.HttpNfcLeaseCompleteBody{Fault_: leaseStateFault(l)}
	}
	simulator.Map.Update(l, []types.PropertyChange{{Name: "state", Val: types.HttpNfcLeaseStateDone}})
	l.importVM = nil // imported: the VM stays
	l.cleanup()
	return &methods.HttpNfcLeaseCompleteBody{Res: new(types.HttpNfcLeaseCompleteResponse)}
}

func (l *exportLease) HttpNfcLeaseAbort(req *types.HttpNfcLeaseAbort) soap.HasFault {
	if l.State == types.HttpNfcLeaseStateDone || l.State == types.HttpNfcLeaseStateError {
		return &methods.HttpNfcLeaseAbortBody{Fault_: leaseStateFault(l)}
	}
	fault := types.BaseMethodFault(&types.RequestCanceled{})
	if req.Fault != nil && req.Fault.Fault != nil {
		fault = req.Fault.Fault
	}
	l.setError(fault)
	return &methods.HttpNfcLeaseAbortBody{Res: new(types.HttpNfcLeaseAbortResponse)}
}

// serveNFC serves an export lease's disks (session-checked, ranged GET supported) while the
// lease is ready; afterwards, or for an unknown lease, 404 as vCenter does.
func (h *interceptor) serveNFC(w http.ResponseWriter, r *http.Request) {
	if !h.validSession(r) {
		http.Error(w, "401 Unauthorized: a valid vmware_soap_session cookie is required", http.StatusUnauthorized)
		return
	}
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/nfc/"), "/")
	if len(parts) != 2 {
		http.NotFound(w, r)
		return
	}
	v, ok := leases.Load(parts[0])
	if !ok {
		http.NotFound(w, r)
		return
	}
	lease := v.(*exportLease)
	if lease.uploads != nil {
		serveUpload(w, r, lease, parts[1])
		return
	}
	var file string
	var state types.HttpNfcLeaseState
	simulator.Map.WithLock(lease, func() { file, state = lease.files[parts[1]], lease.State })
	if state != types.HttpNfcLeaseStateReady || file == "" {
		http.Error(w, "404 Not Found: lease "+parts[0]+" is "+string(state), http.StatusNotFound)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		http.Error(w, "405 Method Not Allowed", http.StatusMethodNotAllowed)
		return
	}
	f, err := os.Open(file)
	if err != nil {
		http.NotFound(w, r)
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	http.ServeContent(w, r, parts[1], fi.ModTime(), f)
}
