package main

import (
	"context"
	"fmt"
	"net/url"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/types"
)

// addDisks gives every VM disks 2..n (`[LocalDS_0] VM/diskK.vmdk` on the first SCSI
// controller) through upstream's own ReconfigVM_Task, before any client connects, so that
// multi-disk VMs look exactly like ones a client reconfigured.
func addDisks(sdk string, user *url.Userinfo, n int) error {
	if n <= 1 {
		return nil
	}
	ctx := context.Background()
	u, err := url.Parse(sdk)
	if err != nil {
		return err
	}
	u.User = user
	c, err := govmomi.NewClient(ctx, u, true)
	if err != nil {
		return fmt.Errorf("connecting to add disks: %w", err)
	}
	defer func() { _ = c.Logout(ctx) }()
	for _, sim := range allVMs() {
		vm := object.NewVirtualMachine(c.Client, sim.Self)
		devices, err := vm.Device(ctx)
		if err != nil {
			return err
		}
		ctrl, err := devices.FindSCSIController("")
		if err != nil {
			return fmt.Errorf("VM %s: %w", sim.Name, err)
		}
		var ds types.ManagedObjectReference
		if len(sim.Datastore) > 0 {
			ds = sim.Datastore[0]
		}
		for k := 2; k <= n; k++ {
			disk := devices.CreateDisk(ctrl, ds, fmt.Sprintf("[LocalDS_0] %s/disk%d.vmdk", sim.Name, k))
			disk.CapacityInKB = defaultDiskSize / 1024
			if err := vm.AddDevice(ctx, disk); err != nil {
				return fmt.Errorf("VM %s: adding disk %d: %w", sim.Name, k, err)
			}
			if devices, err = vm.Device(ctx); err != nil {
				return err
			}
		}
	}
	return nil
}
