package main

import (
	"net/http"
	"sync/atomic"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type ownMethod func(r *http.Request, m *simulator.Method) (soap.HasFault, *methodFault)

// ownMethods are the SOAP methods the interceptor answers itself, with store.mu held.
var ownMethods map[string]ownMethod

func init() {
	ownMethods = map[string]ownMethod{
		"QueryChangedDiskAreas":        queryChangedDiskAreas,
		"ExportVm":                     exportVM,
		"RevertToSnapshot_Task":        refuseRevert,
		"RevertToCurrentSnapshot_Task": refuseRevert,
		"HasPrivilegeOnEntities":       hasPrivilegeOnEntities,
		"HasPrivilegeOnEntity":         hasPrivilegeOnEntity,
		"HasUserPrivilegeOnEntities":   hasUserPrivilegeOnEntities,
		"FetchUserPrivilegeOnEntities": fetchUserPrivilegeOnEntities,
		"ContinueRetrievePropertiesEx": continueRetrieve,
		"CancelRetrievePropertiesEx":   cancelRetrieve,
	}
}

// cbtWindow bounds the range one QueryChangedDiskAreas answer covers, as vCenter answers
// in chunks and clients loop from startOffset+length; settable through the control API.
var cbtWindow int64 = 256 << 20

func getCBTWindow() int64  { return atomic.LoadInt64(&cbtWindow) }
func setCBTWindow(n int64) { atomic.StoreInt64(&cbtWindow, n) }

func vmByRef(ref types.ManagedObjectReference) (*simulator.VirtualMachine, *methodFault) {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return nil, newFault(&types.ManagedObjectNotFound{Obj: ref}, "The object '%s' has already been deleted or has not been completely created", ref.Value)
	}
	return vm, nil
}

func invalidArgument(prop, format string, args ...interface{}) *methodFault {
	return newFault(&types.InvalidArgument{InvalidProperty: prop}, format, args...)
}

// fileFault is what vCenter answers for a changeId it cannot use: "Error caused by file".
func fileFault(d *disk, i int) *methodFault {
	name := d.layerDescriptor(i)
	return newFault(&types.FileFault{File: name}, "Error caused by file %s", name)
}

func queryChangedDiskAreas(_ *http.Request, m *simulator.Method) (soap.HasFault, *methodFault) {
	req := m.Body.(*types.QueryChangedDiskAreas)
	vm, f := vmByRef(req.This)
	if f != nil {
		return nil, f
	}
	d := store.disks[diskID(vm.Self, req.DeviceKey)]
	if d == nil {
		return nil, invalidArgument("deviceKey", "A specified parameter was not correct: deviceKey")
	}
	if !d.cbt.enabled {
		// vCenter: "Change tracking is not active on the virtual disk" as a FileFault.
		return nil, fileFault(d, len(d.layers)-1)
	}
	// The point in time asked about: a snapshot's frozen layer, or (no snapshot) the
	// current state, which vCenter only allows while the VM is powered off.
	var layer int
	var toEpoch string
	var toSeq int64
	if req.Snapshot == nil {
		if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
			return nil, newFault(&types.InvalidPowerState{ExistingState: vm.Runtime.PowerState, RequestedState: types.VirtualMachinePowerStatePoweredOff},
				"QueryChangedDiskAreas without a snapshot needs the VM powered off")
		}
		layer, toEpoch, toSeq = len(d.layers)-1, d.cbt.epoch, d.cbt.seq
	} else {
		layer = -1
		for i, rec := range d.chain {
			if rec.ref == *req.Snapshot {
				layer, toEpoch, toSeq = i, rec.cbtEpoch, rec.cbtSeq
			}
		}
		if layer < 0 {
			if _, ok := simulator.Map.Get(*req.Snapshot).(*simulator.VirtualMachineSnapshot); ok {
				return nil, invalidArgument("snapshot", "snapshot %s is not a snapshot of %s", req.Snapshot.Value, vm.Name)
			}
			return nil, newFault(&types.ManagedObjectNotFound{Obj: *req.Snapshot}, "The object '%s' has already been deleted or has not been completely created", req.Snapshot.Value)
		}
		if toEpoch != d.cbt.epoch {
			// CBT was reset since that snapshot: its changeId means nothing any more.
			return nil, fileFault(d, layer)
		}
	}
	size, err := d.size()
	if err != nil {
		return nil, newFault(&types.SystemError{Reason: err.Error()}, "stat %s: %v", d.current(), err)
	}
	if req.StartOffset < 0 || req.StartOffset >= size {
		return nil, invalidArgument("startOffset", "A specified parameter was not correct: startOffset")
	}

	var areas []extent
	if req.ChangeId == "*" {
		areas, err = allocatedAreas(d.layers[layer])
		if err != nil {
			return nil, newFault(&types.SystemError{Reason: err.Error()}, "reading %s: %v", d.layers[layer], err)
		}
	} else {
		epoch, seq, ok := parseChangeID(req.ChangeId)
		if !ok || epoch != toEpoch || seq > toSeq {
			return nil, fileFault(d, layer)
		}
		areas = d.cbt.changedSince(seq, toSeq)
	}

	length := size - req.StartOffset
	if w := getCBTWindow(); length > w {
		length = w
	}
	info := types.DiskChangeInfo{StartOffset: req.StartOffset, Length: length}
	for _, e := range clipExtents(areas, req.StartOffset, req.StartOffset+length) {
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: e.start, Length: e.length})
	}
	return &methods.QueryChangedDiskAreasBody{Res: &types.QueryChangedDiskAreasResponse{Returnval: info}}, nil
}

func refuseRevert(_ *http.Request, m *simulator.Method) (soap.HasFault, *methodFault) {
	return nil, newFault(&types.NotSupported{}, "rehost-vcsim: reverting to a snapshot is not supported (it would branch the disk chain)")
}
