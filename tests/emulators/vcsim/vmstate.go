package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// store holds every disk the emulator manages. Its mutex serialises guest writes,
// snapshot bookkeeping and CBT queries; it is always taken before an upstream object lock.
type diskStore struct {
	mu    sync.Mutex
	disks map[string]*disk // by vm moref value + "/" + device key
}

var store = &diskStore{disks: map[string]*disk{}}

func diskID(vm types.ManagedObjectReference, key int32) string {
	return fmt.Sprintf("%s/%d", vm.Value, key)
}

func allVMs() []*simulator.VirtualMachine {
	var out []*simulator.VirtualMachine
	for _, e := range simulator.Map.All("VirtualMachine") {
		if vm, ok := e.(*simulator.VirtualMachine); ok {
			out = append(out, vm)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func findVM(name string) *simulator.VirtualMachine {
	for _, vm := range allVMs() {
		if vm.Name == name {
			return vm
		}
	}
	return nil
}

// findDisk looks a disk up by VM name and device key; the caller holds store.mu.
func (s *diskStore) findDisk(vmName string, key int32) (*disk, error) {
	vm := findVM(vmName)
	if vm == nil {
		return nil, fmt.Errorf("no VM named %q", vmName)
	}
	d := s.disks[diskID(vm.Self, key)]
	if d == nil {
		return nil, fmt.Errorf("VM %q has no disk with key %d", vmName, key)
	}
	return d, nil
}

// snapshotChain walks a VM's snapshot tree from the root along first children: the
// emulator supports a linear chain (revert, which would branch it, is refused).
func snapshotChain(vm *simulator.VirtualMachine) []types.ManagedObjectReference {
	var out []types.ManagedObjectReference
	if vm.Snapshot == nil {
		return nil
	}
	list := vm.Snapshot.RootSnapshotList
	for len(list) > 0 {
		out = append(out, list[0].Snapshot)
		list = list[0].ChildSnapshotList
	}
	return out
}

// reconcile brings the emulator's disks in line with upstream's model after any call that
// may have changed it: new disks get a flat file, CBT follows the VM's flag, snapshots
// created since freeze their layer, removed snapshots are consolidated, and the reported
// backing (fileName, changeId, parent) and capacity follow. The caller holds store.mu.
func (s *diskStore) reconcile() error {
	var first error
	for _, vm := range allVMs() {
		simulator.Map.WithLock(vm, func() {
			if err := s.reconcileVM(vm); err != nil && first == nil {
				first = fmt.Errorf("VM %s: %w", vm.Name, err)
			}
		})
	}
	return first
}

func (s *diskStore) reconcileVM(vm *simulator.VirtualMachine) error {
	if vm.Config == nil {
		return nil
	}
	before := diskSignature(vm)
	defer func() {
		// Tell property collectors (WaitForUpdatesEx listeners) when a disk's backing or
		// capacity changed, as upstream does for its own device changes.
		if diskSignature(vm) != before {
			simulator.Map.Update(vm, []types.PropertyChange{
				{Name: "config.hardware.device", Val: []types.BaseVirtualDevice(vm.Config.Hardware.Device)},
			})
		}
	}()
	cbtOn := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	chain := snapshotChain(vm)
	present := map[types.ManagedObjectReference]bool{}
	for _, r := range chain {
		present[r] = true
	}
	for _, dev := range vm.Config.Hardware.Device {
		vd, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		backing, ok := vd.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		d := s.disks[diskID(vm.Self, vd.Key)]
		if d == nil {
			var err error
			if d, err = s.register(vm, vd.Key, backing.FileName); err != nil {
				return err
			}
		}
		if cbtOn && !d.cbt.enabled {
			d.cbt.enable()
		} else if !cbtOn && d.cbt.enabled {
			d.cbt.disable()
		}
		// Snapshots removed upstream: consolidate their layers (oldest first).
		for k := 0; k < len(d.chain); {
			if present[d.chain[k].ref] {
				k++
				continue
			}
			if err := d.consolidate(k); err != nil {
				return err
			}
		}
		// Snapshots created upstream since the last call: freeze the current layer.
		known := map[types.ManagedObjectReference]bool{}
		for _, r := range d.chain {
			known[r.ref] = true
		}
		for _, r := range chain {
			if !known[r] {
				if err := d.freeze(r); err != nil {
					return err
				}
			}
		}
		size, err := d.size()
		if err != nil {
			return err
		}
		vd.CapacityInBytes = size
		vd.CapacityInKB = size / 1024
		backing.FileName = d.layerDescriptor(len(d.layers) - 1)
		backing.ChangeId = d.cbt.changeID()
		backing.Parent = d.parentBacking(len(d.layers)-2, backing)
		for i, rec := range d.chain {
			d.setSnapshotBacking(rec, i, size)
		}
	}
	return nil
}

// register starts managing a disk upstream created: its flat file gets a default size when
// it does not exist yet (upstream creates only an empty descriptor).
func (s *diskStore) register(vm *simulator.VirtualMachine, key int32, fileName string) (*disk, error) {
	ds, dir, stem, err := parseBackingName(fileName)
	if err != nil {
		return nil, err
	}
	d := &disk{vmName: vm.Name, vmRef: vm.Self, key: key, dsName: ds, dir: dir, stem: stem}
	d.layers = []string{d.layerFile(0)}
	flat := d.layerFile(0)
	if err := os.MkdirAll(filepath.Dir(flat), 0o755); err != nil {
		return nil, err
	}
	// Upstream leaves an empty flat file (or none): a fresh disk gets the default size.
	fi, err := os.Stat(flat)
	switch {
	case errors.Is(err, os.ErrNotExist) || err == nil && fi.Size() == 0:
		if err := os.WriteFile(flat, nil, 0o644); err != nil {
			return nil, err
		}
		if err := os.Truncate(flat, defaultDiskSize); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	}
	size := int64(defaultDiskSize)
	if fi != nil && fi.Size() > 0 {
		size = fi.Size()
	}
	if err := d.writeDescriptor(size); err != nil {
		return nil, err
	}
	s.disks[diskID(vm.Self, key)] = d
	return d, nil
}

// freeze records a new snapshot: the current layer stays as it is and becomes frozen, and a
// new layer the guest writes to starts as a link to it (copied at the first write, see
// unshare), so a snapshot costs no time whatever the disk's size, as on ESXi.
func (d *disk) freeze(ref types.ManagedObjectReference) error {
	n := len(d.layers)
	_ = os.Remove(d.layerFile(n)) // a leftover of an earlier chain would make Link fail
	if err := os.Link(d.current(), d.layerFile(n)); err != nil {
		return fmt.Errorf("creating delta for snapshot %s: %w", ref.Value, err)
	}
	d.layers = append(d.layers, d.layerFile(n))
	d.chain = append(d.chain, snapRecord{ref: ref, changeID: d.cbt.changeID(), cbtEpoch: d.cbt.epoch, cbtSeq: d.cbt.seq})
	// The snapshot's config was copied from the VM by upstream sharing the device objects;
	// give it its own disk so that later changes to the VM's backing do not show through.
	if snap, ok := simulator.Map.Get(ref).(*simulator.VirtualMachineSnapshot); ok {
		devs := make([]types.BaseVirtualDevice, len(snap.Config.Hardware.Device))
		for i, dev := range snap.Config.Hardware.Device {
			if vd, ok := dev.(*types.VirtualDisk); ok {
				c := *vd
				if b, ok := vd.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
					bc := *b
					c.Backing = &bc
				}
				devs[i] = &c
				continue
			}
			devs[i] = dev
		}
		snap.Config.Hardware.Device = devs
	}
	logf("disk %s key %d: snapshot %s freezes %s", d.vmName, d.key, ref.Value, d.layers[n-1])
	return nil
}

// consolidate removes snapshot chain[k]: the next layer (newer state) replaces the frozen
// one, and later layers move down one name, as a vCenter consolidation leaves them.
func (d *disk) consolidate(k int) error {
	n := len(d.layers)
	for j := k + 1; j < n; j++ {
		if err := os.Rename(d.layerFile(j), d.layerFile(j-1)); err != nil {
			return fmt.Errorf("consolidating snapshot %s: %w", d.chain[k].ref.Value, err)
		}
	}
	// Renaming a layer over a link to the same file (one the guest never wrote) changes
	// nothing and leaves its name behind: remove it, or the next write would copy for
	// nothing.
	if err := os.Remove(d.layerFile(n - 1)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("consolidating snapshot %s: %w", d.chain[k].ref.Value, err)
	}
	d.layers = d.layers[:n-1]
	logf("disk %s key %d: snapshot %s consolidated", d.vmName, d.key, d.chain[k].ref.Value)
	d.chain = append(d.chain[:k], d.chain[k+1:]...)
	return nil
}

// parentBacking builds the backing chain of layer i (nil below the base).
func (d *disk) parentBacking(i int, like *types.VirtualDiskFlatVer2BackingInfo) *types.VirtualDiskFlatVer2BackingInfo {
	if i < 0 {
		return nil
	}
	b := &types.VirtualDiskFlatVer2BackingInfo{
		VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{
			FileName:  d.layerDescriptor(i),
			Datastore: like.Datastore,
		},
		DiskMode:        like.DiskMode,
		ThinProvisioned: like.ThinProvisioned,
		Uuid:            like.Uuid,
		ContentId:       like.ContentId,
	}
	b.Parent = d.parentBacking(i-1, like)
	return b
}

// setSnapshotBacking points snapshot chain[i]'s copy of the disk at its frozen layer.
func (d *disk) setSnapshotBacking(rec snapRecord, i int, size int64) {
	snap, ok := simulator.Map.Get(rec.ref).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return
	}
	for _, dev := range snap.Config.Hardware.Device {
		vd, ok := dev.(*types.VirtualDisk)
		if !ok || vd.Key != d.key {
			continue
		}
		b, ok := vd.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		b.FileName = d.layerDescriptor(i)
		b.ChangeId = rec.changeID
		b.Parent = d.parentBacking(i-1, b)
		vd.CapacityInBytes = size
		vd.CapacityInKB = size / 1024
	}
}

// renumberDisks gives the model's disks the keys vCenter gives them (2000 for SCSI0:0,
// 2000+16*bus+unit after) instead of upstream's small sequential ones, so that tests and
// clients see the keys real VMs have. Done once, before any client connects.
func renumberDisks() {
	for _, vm := range allVMs() {
		simulator.Map.WithLock(vm, func() {
			devs := vm.Config.Hardware.Device
			for _, dev := range devs {
				vd, ok := dev.(*types.VirtualDisk)
				if !ok || vd.UnitNumber == nil {
					continue
				}
				var ctrl types.BaseVirtualController
				for _, c := range devs {
					if c.GetVirtualDevice().Key == vd.ControllerKey {
						ctrl, _ = c.(types.BaseVirtualController)
					}
				}
				if ctrl == nil {
					continue
				}
				if _, scsi := ctrl.(types.BaseVirtualSCSIController); !scsi {
					continue
				}
				old := vd.Key
				key := 2000 + 16*ctrl.GetVirtualController().BusNumber + *vd.UnitNumber
				vd.Key = key
				children := ctrl.GetVirtualController().Device
				for i := range children {
					if children[i] == old {
						children[i] = key
					}
				}
				if vm.LayoutEx != nil {
					for i := range vm.LayoutEx.Disk {
						if vm.LayoutEx.Disk[i].Key == old {
							vm.LayoutEx.Disk[i].Key = key
						}
					}
				}
				if vm.Layout != nil {
					for i := range vm.Layout.Disk {
						if vm.Layout.Disk[i].Key == old {
							vm.Layout.Disk[i].Key = key
						}
					}
				}
			}
		})
	}
}

// diskSignature summarises what reconcile may change in a VM's disks.
func diskSignature(vm *simulator.VirtualMachine) string {
	var sb strings.Builder
	for _, dev := range vm.Config.Hardware.Device {
		vd, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		fmt.Fprintf(&sb, "%d:%d", vd.Key, vd.CapacityInBytes)
		if b, ok := vd.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
			fmt.Fprintf(&sb, ":%s:%s", b.FileName, b.ChangeId)
		}
		sb.WriteByte(';')
	}
	return sb.String()
}

// diskWithSnapshotsOwning finds the disk with snapshots one of whose layer files is rel
// (datastore-relative); the caller holds store.mu.
func (s *diskStore) diskWithSnapshotsOwning(rel string) *disk {
	abs := filepath.Join(datastoreDir, filepath.Clean("/"+rel))
	for _, d := range s.disks {
		if len(d.chain) == 0 {
			continue
		}
		for i := range d.layers {
			if d.layerFile(i) == abs {
				return d
			}
		}
	}
	return nil
}
