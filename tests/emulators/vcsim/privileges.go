package main

import (
	"net/http"
	"sort"
	"sync"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// methodPrivileges maps the calls rehost makes to the privilege vCenter checks for them
// (vSphere "Required Privileges" of each method), so that a denied privilege makes the
// call fail with NoPermission as it would for a user whose role lacks it.
var methodPrivileges = map[string]string{
	"CreateSnapshot_Task":     "VirtualMachine.State.CreateSnapshot",
	"RemoveSnapshot_Task":     "VirtualMachine.State.RemoveSnapshot",
	"RemoveAllSnapshots_Task": "VirtualMachine.State.RemoveSnapshot",
	"QueryChangedDiskAreas":   "VirtualMachine.Provisioning.DiskRandomRead",
	"ExportVm":                "VApp.Export",
	"ImportVApp":              "VApp.Import",
	"ReconfigVM_Task":         "VirtualMachine.Config.Settings",
	"PowerOffVM_Task":         "VirtualMachine.Interact.PowerOff",
	"PowerOnVM_Task":          "VirtualMachine.Interact.PowerOn",
	"ShutdownGuest":           "VirtualMachine.Interact.PowerOff",
}

// folderPrivilege is what the datastore /folder URL needs (GET: browse; PUT: file management).
func folderPrivilege(method string) string {
	if method == http.MethodGet || method == http.MethodHead {
		return "Datastore.Browse"
	}
	return "Datastore.FileManagement"
}

var privilegeQueries = map[string]bool{
	"HasPrivilegeOnEntities": true, "HasPrivilegeOnEntity": true,
	"HasUserPrivilegeOnEntities": true, "FetchUserPrivilegeOnEntities": true,
}

type privilegeTable struct {
	mu     sync.Mutex
	denied map[string]bool
}

var privileges = &privilegeTable{denied: map[string]bool{}}

func (p *privilegeTable) set(ids []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.denied = map[string]bool{}
	for _, id := range ids {
		if id != "" {
			p.denied[id] = true
		}
	}
}

func (p *privilegeTable) list() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := []string{}
	for id := range p.denied {
		out = append(out, id)
	}
	sort.Strings(out)
	return out
}

func (p *privilegeTable) active() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.denied) > 0
}

func (p *privilegeTable) granted(id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.denied[id]
}

// deniedFor returns the privilege a call needs when it is denied, "" otherwise.
func (p *privilegeTable) deniedFor(method string) string {
	id, ok := methodPrivileges[method]
	if !ok || p.granted(id) {
		return ""
	}
	return id
}

func entityPrivileges(entities []types.ManagedObjectReference, ids []string) []types.EntityPrivilege {
	var out []types.EntityPrivilege
	for _, e := range entities {
		ep := types.EntityPrivilege{Entity: e}
		for _, id := range ids {
			ep.PrivAvailability = append(ep.PrivAvailability, types.PrivilegeAvailability{PrivId: id, IsGranted: privileges.granted(id)})
		}
		out = append(out, ep)
	}
	return out
}

func hasPrivilegeOnEntities(_ *http.Request, m *simulator.Method) (soap.HasFault, *methodFault) {
	req := m.Body.(*types.HasPrivilegeOnEntities)
	return &methods.HasPrivilegeOnEntitiesBody{Res: &types.HasPrivilegeOnEntitiesResponse{Returnval: entityPrivileges(req.Entity, req.PrivId)}}, nil
}

func hasUserPrivilegeOnEntities(_ *http.Request, m *simulator.Method) (soap.HasFault, *methodFault) {
	req := m.Body.(*types.HasUserPrivilegeOnEntities)
	return &methods.HasUserPrivilegeOnEntitiesBody{Res: &types.HasUserPrivilegeOnEntitiesResponse{Returnval: entityPrivileges(req.Entities, req.PrivId)}}, nil
}

func hasPrivilegeOnEntity(_ *http.Request, m *simulator.Method) (soap.HasFault, *methodFault) {
	req := m.Body.(*types.HasPrivilegeOnEntity)
	out := make([]bool, len(req.PrivId))
	for i, id := range req.PrivId {
		out[i] = privileges.granted(id)
	}
	return &methods.HasPrivilegeOnEntityBody{Res: &types.HasPrivilegeOnEntityResponse{Returnval: out}}, nil
}

func fetchUserPrivilegeOnEntities(_ *http.Request, m *simulator.Method) (soap.HasFault, *methodFault) {
	req := m.Body.(*types.FetchUserPrivilegeOnEntities)
	var admin []string
	ref := types.ManagedObjectReference{Type: "AuthorizationManager", Value: "AuthorizationManager"}
	if am, ok := simulator.Map.Get(ref).(*simulator.AuthorizationManager); ok {
		admin = object.AuthorizationRoleList(am.RoleList).ByName("Admin").Privilege
	}
	var kept []string
	for _, id := range admin {
		if privileges.granted(id) {
			kept = append(kept, id)
		}
	}
	var out []types.UserPrivilegeResult
	for _, e := range req.Entities {
		out = append(out, types.UserPrivilegeResult{Entity: e, Privileges: kept})
	}
	return &methods.FetchUserPrivilegeOnEntitiesBody{Res: &types.FetchUserPrivilegeOnEntitiesResponse{Returnval: out}}, nil
}
